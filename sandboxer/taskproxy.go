package sandboxer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

// TaskProxy is the task API containerd talks to: a small, long-lived
// process (containerd-shim-resource-slot-v1 serve) that forwards every call
// to the sandboxer's TaskServer.
//
// containerd treats the ttrpc connection of a task as its shim: when it
// closes, containerd cleans up the "dead shim" and reports the container
// exited. The proxy holds those connections so that the sandboxer can be
// restarted, or killed, without containerd noticing: calls that need the
// sandboxer wait for it to come back (idempotent ones, such as Wait, are
// re-sent on the new connection).
type TaskProxy struct {
	upstream string

	mu     sync.Mutex
	client *ttrpc.Client
	lastOK time.Time
}

var _ taskAPI.TTRPCTaskService = (*TaskProxy)(nil)

// NewTaskProxy forwards to the TaskServer listening on the unix socket
// upstream.
func NewTaskProxy(upstream string) *TaskProxy {
	return &TaskProxy{upstream: upstream, lastOK: time.Now()}
}

// Register registers the proxy on a ttrpc server.
func (p *TaskProxy) Register(srv *ttrpc.Server) { taskAPI.RegisterTTRPCTaskService(srv, p) }

// Unreachable is how long the upstream has been unreachable (0 when it
// is reachable), for the shim's orphan timeout.
func (p *TaskProxy) Unreachable() time.Duration {
	if _, err := p.conn(); err == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return time.Since(p.lastOK)
}

func (p *TaskProxy) conn() (*ttrpc.Client, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client != nil {
		return p.client, nil
	}
	c, err := net.DialTimeout("unix", p.upstream, time.Second)
	if err != nil {
		return nil, err
	}
	var client *ttrpc.Client
	client = ttrpc.NewClient(c, ttrpc.WithOnClose(func() {
		// The sandboxer went away (restarted, killed): forget the dead
		// connection now, so that the next call dials the new sandboxer
		// instead of failing on it, which a call that cannot be re-sent
		// (Create, Start) would report as "went away during the call".
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.client == client {
			p.client = nil
		}
	}))
	p.client = client
	p.lastOK = time.Now()
	return p.client, nil
}

// drop forgets a broken connection (unless another call already has).
func (p *TaskProxy) drop(c *ttrpc.Client) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client == c {
		c.Close()
		p.client = nil
	}
}

// Close closes the upstream connection.
func (p *TaskProxy) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client != nil {
		p.client.Close()
		p.client = nil
	}
}

// maxRetryBackoff caps the wait between attempts to reach the sandboxer.
const maxRetryBackoff = time.Second

// forward calls fn on the upstream. A call that could not be sent is
// retried until ctx ends; one whose connection broke after it was sent is
// re-sent only if idempotent, since the sandboxer may have carried it out.
func forward[R any](ctx context.Context, p *TaskProxy, idempotent bool, fn func(context.Context, taskAPI.TTRPCTaskService) (R, error)) (R, error) {
	var zero R
	backoff := 50 * time.Millisecond
	for {
		c, err := p.conn()
		if err == nil {
			r, err := fn(ctx, taskAPI.NewTTRPCTaskClient(c))
			if !errors.Is(err, ttrpc.ErrClosed) {
				return r, err
			}
			p.drop(c)
			if !idempotent {
				return zero, errgrpc.ToGRPCf(errdefs.ErrUnavailable, "resource-slot-sandboxer went away during the call; retry it")
			}
		}
		log.G(ctx).WithError(err).Debug("sandboxer unreachable; retrying")
		select {
		case <-ctx.Done():
			return zero, errgrpc.ToGRPC(fmt.Errorf("resource-slot-sandboxer is unreachable at %s: %w", p.upstream, errdefs.ErrUnavailable))
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, maxRetryBackoff)
	}
}

func (p *TaskProxy) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.StateResponse, error) {
		return s.State(ctx, r)
	})
}

func (p *TaskProxy) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.CreateTaskResponse, error) {
		return s.Create(ctx, r)
	})
}

func (p *TaskProxy) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.StartResponse, error) {
		return s.Start(ctx, r)
	})
}

func (p *TaskProxy) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.DeleteResponse, error) {
		return s.Delete(ctx, r)
	})
}

func (p *TaskProxy) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.PidsResponse, error) {
		return s.Pids(ctx, r)
	})
}

func (p *TaskProxy) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) { return s.Pause(ctx, r) })
}

func (p *TaskProxy) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) { return s.Resume(ctx, r) })
}

func (p *TaskProxy) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) {
		return s.Checkpoint(ctx, r)
	})
}

func (p *TaskProxy) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) { return s.Kill(ctx, r) })
}

func (p *TaskProxy) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, false, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) { return s.Exec(ctx, r) })
}

func (p *TaskProxy) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) {
		return s.ResizePty(ctx, r)
	})
}

func (p *TaskProxy) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) {
		return s.CloseIO(ctx, r)
	})
}

func (p *TaskProxy) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*emptypb.Empty, error) { return s.Update(ctx, r) })
}

func (p *TaskProxy) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	for {
		resp, err := forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.WaitResponse, error) {
			return s.Wait(ctx, r)
		})
		// The sandboxer ends Wait calls with Unavailable when it shuts
		// down; wait again on the next instance.
		if err != nil && errdefs.IsUnavailable(errgrpc.ToNative(err)) && ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		return resp, err
	}
}

func (p *TaskProxy) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.StatsResponse, error) {
		return s.Stats(ctx, r)
	})
}

func (p *TaskProxy) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return forward(ctx, p, true, func(ctx context.Context, s taskAPI.TTRPCTaskService) (*taskAPI.ConnectResponse, error) {
		return s.Connect(ctx, r)
	})
}

// Shutdown is containerd releasing one task's "shim": the proxy serves
// all tasks and stays up.
func (p *TaskProxy) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}
