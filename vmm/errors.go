package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/digitalocean/go-libvirt"
)

// libvirtCode returns the libvirt error number of err, if it is one.
func libvirtCode(err error) (libvirt.ErrorNumber, bool) {
	var le libvirt.Error
	if errors.As(err, &le) {
		return libvirt.ErrorNumber(le.Code), true
	}
	return 0, false
}

func isCode(err error, codes ...libvirt.ErrorNumber) bool {
	c, ok := libvirtCode(err)
	if !ok {
		return false
	}
	for _, want := range codes {
		if c == want {
			return true
		}
	}
	return false
}

// isNotRunning reports libvirt's "domain is not running" (and its kin).
func isNotRunning(err error) bool {
	return isCode(err, libvirt.ErrOperationInvalid)
}

// mapErr wraps a libvirt (or connection) error with the errdefs sentinel
// that matches it, keeping libvirt's message: "op: message".
func mapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if errdefs.IsNotFound(err) || errdefs.IsInvalidArgument(err) || errdefs.IsAlreadyExists(err) ||
		errdefs.IsFailedPrecondition(err) || errdefs.IsUnavailable(err) || errdefs.IsDeadlineExceeded(err) ||
		errdefs.IsCanceled(err) {
		return fmt.Errorf("%s: %w", op, err)
	}
	var sentinel error
	if c, ok := libvirtCode(err); ok {
		switch c {
		case libvirt.ErrNoDomain, libvirt.ErrNoDomainMetadata:
			sentinel = errdefs.ErrNotFound
		case libvirt.ErrDomExist:
			sentinel = errdefs.ErrAlreadyExists
		case libvirt.ErrInvalidArg, libvirt.ErrXMLError, libvirt.ErrXMLDetail, libvirt.ErrConfigUnsupported,
			libvirt.ErrArgumentUnsupported:
			sentinel = errdefs.ErrInvalidArgument
		case libvirt.ErrOperationInvalid:
			sentinel = errdefs.ErrFailedPrecondition
		case libvirt.ErrNoSupport, libvirt.ErrOperationUnsupported:
			sentinel = errdefs.ErrNotImplemented
		case libvirt.ErrOperationTimeout, libvirt.ErrAgentUnresponsive:
			sentinel = context.DeadlineExceeded
		case libvirt.ErrResourceBusy:
			sentinel = errdefs.ErrConflict
		case libvirt.ErrNoConnect, libvirt.ErrRPC, libvirt.ErrAuthFailed:
			sentinel = errdefs.ErrUnavailable
		default:
			sentinel = errdefs.ErrUnknown
		}
	} else {
		var ne net.Error
		switch {
		case errors.As(err, &ne), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOENT),
			errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.EINVAL), errors.Is(err, io.EOF),
			errors.Is(err, net.ErrClosed):
			sentinel = errdefs.ErrUnavailable
		default:
			sentinel = errdefs.ErrUnknown
		}
	}
	return fmt.Errorf("%s: %w: %w", op, err, sentinel)
}

// qemuImgErr says what a failed qemu-img run is: the caller's end
// (cancelled, timed out), a host that lacks the tool or the base image
// (FailedPrecondition), a full disk (ResourceExhausted), a permission
// problem; anything else is the host's failure (Unknown), never the
// caller's argument.
func qemuImgErr(ctx context.Context, bin string, args []string, out []byte, err error) error {
	msg := strings.TrimSpace(string(out))
	what := fmt.Sprintf("create overlay disk: %s %s: %v", bin, strings.Join(args, " "), err)
	if msg != "" {
		what += ": " + msg
	}
	var sentinel error
	switch {
	case ctx.Err() != nil:
		sentinel = ctx.Err()
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, os.ErrNotExist):
		sentinel = errdefs.ErrFailedPrecondition
	case strings.Contains(msg, "No space left on device"), strings.Contains(msg, "Disk quota exceeded"):
		sentinel = errdefs.ErrResourceExhausted
	case strings.Contains(msg, "Permission denied"), strings.Contains(msg, "Operation not permitted"):
		sentinel = errdefs.ErrPermissionDenied
	case strings.Contains(msg, "Could not open backing file"), strings.Contains(msg, "No such file or directory"):
		sentinel = errdefs.ErrFailedPrecondition
	default:
		sentinel = errdefs.ErrUnknown
	}
	return fmt.Errorf("%s: %w", what, sentinel)
}
