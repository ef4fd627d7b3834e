package slotctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/kuasar-io/resource-slot-sandboxer/admin/api"
)

// DefaultSocket is the admin socket of a daemon with the default listen.
const DefaultSocket = "/run/resource-slot-sandboxer-admin.sock"

// Client calls the admin API on a unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the admin API at socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: 90 * time.Second}}
}

// APIError is an error the daemon answered with.
type APIError struct {
	Status int
	Body   api.Error
}

func (e *APIError) Error() string { return e.Body.Error }

// Code is the error's class (api.Code*).
func (e *APIError) Code() string { return e.Body.Code }

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://resource-slot-sandboxer"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read the answer of %s: %w", c.socket, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(data, &e.Body) != nil || e.Body.Error == "" {
			e.Body.Error = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(data)))
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("malformed answer from %s: %w", c.socket, err)
	}
	return nil
}

// dialError says why the daemon cannot be reached, in one line.
func (c *Client) dialError(err error) error {
	if errors.Is(err, context.Canceled) {
		return err
	}
	var hint string
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.ECONNREFUSED):
		hint = " (is resource-slot-sandboxer running? --socket names another admin socket)"
	case errors.Is(err, os.ErrPermission):
		hint = " (the admin socket is root's: run as root)"
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		err = op.Err
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
	}
	return fmt.Errorf("cannot reach the sandboxer at %s: %v%s", c.socket, err, hint)
}

// List lists the sandboxes.
func (c *Client) List(ctx context.Context) ([]api.Sandbox, error) {
	var out []api.Sandbox
	return out, c.do(ctx, http.MethodGet, api.PathSandboxes, nil, &out)
}

// Limits returns a sandbox's limits.
func (c *Client) Limits(ctx context.Context, id string) (api.Limits, error) {
	var out api.Limits
	return out, c.do(ctx, http.MethodGet, api.SandboxPath(url.PathEscape(id), "limits"), nil, &out)
}

// Usage returns what a sandbox uses.
func (c *Client) Usage(ctx context.Context, id string) (api.Usage, error) {
	var out api.Usage
	return out, c.do(ctx, http.MethodGet, api.SandboxPath(url.PathEscape(id), "usage"), nil, &out)
}

// SetResources resizes a sandbox and returns its new limits.
func (c *Client) SetResources(ctx context.Context, id string, req api.SetResources) (api.Limits, error) {
	var out api.Limits
	return out, c.do(ctx, http.MethodPut, api.SandboxPath(url.PathEscape(id), "resources"), req, &out)
}

// Capacity returns the node's capacity.
func (c *Client) Capacity(ctx context.Context) (api.Capacity, error) {
	var out api.Capacity
	return out, c.do(ctx, http.MethodGet, api.PathCapacity, nil, &out)
}

// Cost returns the estimated cost.
func (c *Client) Cost(ctx context.Context) (api.Cost, error) {
	var out api.Cost
	return out, c.do(ctx, http.MethodGet, api.PathCost, nil, &out)
}
