package grpcguard

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
)

// panicky panics on a service name of "panic".
type panicky struct {
	healthpb.UnimplementedHealthServer
}

func (panicky) Check(_ context.Context, r *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if r.Service == "panic" {
		var rt *healthpb.HealthCheckRequest
		_ = rt.Service // a nil dereference: a runtime error
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (panicky) Watch(r *healthpb.HealthCheckRequest, s grpc.ServerStreamingServer[healthpb.HealthCheckResponse]) error {
	if r.Service == "panic" {
		panic("stream panic")
	}
	return s.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING})
}

func TestGRPCPanicFailsOneCall(t *testing.T) {
	logs := testenv.CaptureLog(t)
	srv := grpc.NewServer(GRPCServerOptions()...)
	healthpb.RegisterHealthServer(srv, panicky{})
	sock := filepath.Join(t.TempDir(), "g.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	c := healthpb.NewHealthClient(conn)
	ctx := context.Background()
	before := guard.Panics()

	_, err = c.Check(ctx, &healthpb.HealthCheckRequest{Service: "panic"})
	assert.Equal(t, codes.Internal, status.Code(err), "%v", err)
	assert.Contains(t, err.Error(), "/grpc.health.v1.Health/Check")
	st, err := c.Watch(ctx, &healthpb.HealthCheckRequest{Service: "panic"})
	require.NoError(t, err)
	_, err = st.Recv()
	assert.Equal(t, codes.Internal, status.Code(err), "%v", err)

	r, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err, "the server still serves")
	assert.Equal(t, healthpb.HealthCheckResponse_SERVING, r.Status)
	assert.Equal(t, before+2, guard.Panics())
	out := logs.String()
	assert.Contains(t, out, "call panicked")
	assert.Contains(t, out, "nil pointer dereference")
	assert.Contains(t, out, "grpcguard.panicky.Check", "the log has the stack")
}
