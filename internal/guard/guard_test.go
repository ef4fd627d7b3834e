package guard

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/ttrpc"
	"github.com/kuasar-io/resource-slot-sandboxer/internal/testenv"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

func TestTTRPCPanicFailsOneCall(t *testing.T) {
	logs := testenv.CaptureLog(t)
	srv, err := ttrpc.NewServer(TTRPCServerOptions()...)
	require.NoError(t, err)
	srv.RegisterService("test.Panicky", &ttrpc.ServiceDesc{Methods: map[string]ttrpc.Method{
		"Call": func(_ context.Context, unmarshal func(any) error) (any, error) {
			var req emptypb.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			if len(req.ProtoReflect().GetUnknown()) > 0 {
				var p *struct{ x int }
				return &emptypb.Empty{}, func() error { p.x++; return nil }()
			}
			return &emptypb.Empty{}, nil
		},
	}})
	sock := filepath.Join(t.TempDir(), "t.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	conn, err := net.Dial("unix", sock)
	require.NoError(t, err)
	c := ttrpc.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	ctx := context.Background()

	// Any field makes it panic: field 1, varint 1.
	bad := &emptypb.Empty{}
	bad.ProtoReflect().SetUnknown([]byte{0x08, 0x01})
	err = c.Call(ctx, "test.Panicky", "Call", bad, &emptypb.Empty{})
	assert.Equal(t, codes.Internal, status.Code(err), "%v", err)
	assert.NoError(t, c.Call(ctx, "test.Panicky", "Call", &emptypb.Empty{}, &emptypb.Empty{}), "the server still serves")
	out := logs.String()
	assert.Contains(t, out, "nil pointer dereference")
	assert.True(t, strings.Contains(out, "guard.TestTTRPCPanicFailsOneCall"), "the log has the stack")
}
