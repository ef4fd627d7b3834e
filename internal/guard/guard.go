// Package guard keeps one call from taking the daemon down: its
// interceptors (ttrpc here, gRPC in grpcguard) recover a handler's panic, log it with its stack and fail
// that call alone with Internal.
package guard

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync/atomic"

	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// panics counts the panics recovered, for tests and the log.
var panics atomic.Int64

// Panics is how many calls have panicked since the process started.
func Panics() int64 { return panics.Load() }

// Recovered turns a recovered panic into the call's error and logs it
// with the stack of the goroutine that panicked (call it in the deferred
// function that recovered).
func Recovered(ctx context.Context, method string, r any) error {
	n := panics.Add(1)
	log.G(ctx).WithFields(log.Fields{
		"method": method,
		"panic":  fmt.Sprint(r),
		"stack":  string(debug.Stack()),
		"panics": n,
	}).Error("call panicked; it fails alone")
	return status.Errorf(codes.Internal, "%s: internal error: %v", method, r)
}

// TTRPCServerOptions recover the panics of a ttrpc server's calls (ttrpc
// runs each call in a goroutine of its own, where a panic ends the
// process).
func TTRPCServerOptions() []ttrpc.ServerOpt {
	return []ttrpc.ServerOpt{
		ttrpc.WithChainUnaryServerInterceptor(func(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (resp any, err error) {
			defer func() {
				if r := recover(); r != nil {
					resp, err = nil, Recovered(ctx, info.FullMethod, r)
				}
			}()
			return method(ctx, unmarshal)
		}),
	}
}
