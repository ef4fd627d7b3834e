// Package grpcguard recovers the panics of a gRPC server's calls (package
// guard does ttrpc's; this one is apart so that the task shim, which
// serves only ttrpc, does not link gRPC).
package grpcguard

import (
	"context"

	"google.golang.org/grpc"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/guard"
)

// GRPCServerOptions recover the panics of a gRPC server's calls. Give them
// after the other interceptors: the innermost sees the panic first, and
// the others (metrics) see an Internal error.
func GRPCServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
			defer func() {
				if r := recover(); r != nil {
					resp, err = nil, guard.Recovered(ctx, info.FullMethod, r)
				}
			}()
			return handler(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = guard.Recovered(ss.Context(), info.FullMethod, r)
				}
			}()
			return handler(srv, ss)
		}),
	}
}
