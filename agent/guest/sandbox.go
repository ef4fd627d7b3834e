package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/resource-slot-sandboxer/agent/api"
)

// sandboxState is what SetupSandbox did; guarded by Agent.setupMu.
type sandboxState struct {
	id         string
	sharedTag  string
	namespaces []string
	holder     *exec.Cmd
	holderDone chan struct{}
}

// HolderArg0 is argv[0] of the process that holds the pod's shared
// namespaces: the agent binary run again (cmd/rss-guest-agent calls
// HolderMain for it).
const HolderArg0 = "rss-pod-holder"

var tagRE = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,36}$`)

func validateSetup(r *api.SetupSandboxRequest) error {
	if err := identifiers.Validate(r.SandboxId); err != nil {
		return err
	}
	if r.Hostname != "" && !api.ValidHostname(r.Hostname) {
		return fmt.Errorf("hostname %q: %w", r.Hostname, errdefs.ErrInvalidArgument)
	}
	if r.SharedTag != "" && !tagRE.MatchString(r.SharedTag) {
		return fmt.Errorf("shared_tag %q: %w", r.SharedTag, errdefs.ErrInvalidArgument)
	}
	seen := map[string]bool{}
	for _, ns := range r.Namespaces {
		if ns != "ipc" && ns != "uts" && ns != "pid" {
			return fmt.Errorf("namespace %q (ipc, uts, pid): %w", ns, errdefs.ErrInvalidArgument)
		}
		if seen[ns] {
			return fmt.Errorf("namespace %q twice: %w", ns, errdefs.ErrInvalidArgument)
		}
		seen[ns] = true
	}
	for k, v := range r.Sysctls {
		if !api.ValidSysctlName(k) || len(k) > 256 {
			return fmt.Errorf("sysctl %q: %w", k, errdefs.ErrInvalidArgument)
		}
		if api.SysctlNamespace(k) == "" {
			return fmt.Errorf("sysctl %q is not namespaced: %w", k, errdefs.ErrInvalidArgument)
		}
		if len(v) > 1024 || strings.ContainsAny(v, "\x00\n") {
			return fmt.Errorf("sysctl %q value: %w", k, errdefs.ErrInvalidArgument)
		}
	}
	_, err := podLimits(r.Resources, 0)
	return err
}

func sameSet(a, b []string) bool {
	a, b = append([]string(nil), a...), append([]string(nil), b...)
	sort.Strings(a)
	sort.Strings(b)
	return strings.Join(a, ",") == strings.Join(b, ",")
}

// setupSandbox prepares the guest for its pod; see api.SetupSandbox. A
// second call for the same sandbox applies what it can again (limits,
// sysctls, hostname) and restarts a namespace holder that died.
func (a *Agent) setupSandbox(ctx context.Context, r *api.SetupSandboxRequest) error {
	if err := validateSetup(r); err != nil {
		return err
	}
	a.setupMu.Lock()
	defer a.setupMu.Unlock()
	sb := &a.sandbox
	if sb.id != "" && sb.id != r.SandboxId {
		return fmt.Errorf("the guest is set up for sandbox %s: %w", sb.id, errdefs.ErrFailedPrecondition)
	}
	if sb.id != "" && (sb.sharedTag != r.SharedTag || !sameSet(sb.namespaces, r.Namespaces)) {
		return fmt.Errorf("sandbox %s is set up with another share or namespaces: %w", sb.id, errdefs.ErrFailedPrecondition)
	}
	if r.SharedTag != "" && sb.sharedTag == "" {
		if ml := a.cfg.ModulesLoaded; ml != nil {
			select {
			case <-ml:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		dst := filepath.Join(a.cfg.RunDir, sharedDir)
		if err := unix.Mount(r.SharedTag, dst, "virtiofs", unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
			return fmt.Errorf("mount virtio-fs %q at %s: %w", r.SharedTag, dst, err)
		}
		sb.sharedTag = r.SharedTag
		log.G(ctx).WithField("tag", r.SharedTag).Info("shared directory mounted")
	}
	limits, err := podLimits(r.Resources, a.cfg.BootPidsMax)
	if err != nil {
		return err
	}
	if err := applyLimits(a.podDir, limits); err != nil {
		return err
	}
	// Sysctls: the IPC and UTS ones in the holder's namespaces (when the
	// pod shares them), the others in the guest's own (the pod's network
	// is the guest's).
	holderSysctls := map[string]string{}
	for k, v := range r.Sysctls {
		ns := api.SysctlNamespace(k)
		if (ns == "ipc" || ns == "uts") && contains(r.Namespaces, ns) {
			holderSysctls[k] = v
			continue
		}
		if err := writeSysctl(k, v); err != nil {
			return err
		}
	}
	if r.Hostname != "" {
		if err := unix.Sethostname([]byte(r.Hostname)); err != nil {
			return fmt.Errorf("hostname: %w", err)
		}
	}
	if len(r.Namespaces) > 0 {
		if err := a.startHolder(ctx, r.Namespaces, r.Hostname, holderSysctls); err != nil {
			return err
		}
	}
	sb.id = r.SandboxId
	sb.namespaces = append([]string(nil), r.Namespaces...)
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func writeSysctl(k, v string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
	if err := os.WriteFile(p, []byte(v), 0); err != nil {
		return fmt.Errorf("sysctl %s=%q: %v: %w", k, v, err, errdefs.ErrInvalidArgument)
	}
	return nil
}

// startHolder starts the process that holds the pod's shared namespaces
// (unless it runs) and bind-mounts them at RunDir/ns/<type>, then sets the
// hostname and the sysctls in them.
func (a *Agent) startHolder(ctx context.Context, nss []string, hostname string, sysctls map[string]string) error {
	sb := &a.sandbox
	if sb.holder != nil {
		select {
		case <-sb.holderDone:
			sb.holder = nil
		default:
			// Running: apply the sysctls and hostname in its namespaces.
			return a.configureHolder(sb.holder.Process.Pid, nss, hostname, sysctls)
		}
	}
	var flags uintptr
	for _, ns := range nss {
		switch ns {
		case "ipc":
			flags |= unix.CLONE_NEWIPC
		case "uts":
			flags |= unix.CLONE_NEWUTS
		case "pid":
			flags |= unix.CLONE_NEWPID
		}
	}
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	cmd := &exec.Cmd{
		Path: self,
		Args: []string{HolderArg0},
		// No Pdeathsig: it follows the thread that forked, which the Go
		// runtime may end; the holder dies with the guest anyway.
		SysProcAttr: &syscall.SysProcAttr{Cloneflags: flags},
		Stderr:      os.Stderr,
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	ec, err := reaper.Default.Start(cmd)
	if err != nil {
		return fmt.Errorf("start the namespace holder: %w", err)
	}
	done := make(chan struct{})
	go func() {
		status, err := reaper.Default.Wait(cmd, ec)
		log.L.WithError(err).WithField("status", status).Error("the pod's namespace holder exited")
		close(done)
	}()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) != "ready" {
			cmd.Process.Kill()
			return fmt.Errorf("namespace holder: %q", s)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		return errors.New("namespace holder did not start")
	}
	pid := cmd.Process.Pid
	for _, ns := range nss {
		dst := filepath.Join(a.cfg.RunDir, nsDir, ns)
		unix.Unmount(dst, unix.MNT_DETACH)
		if f, err := os.OpenFile(dst, os.O_CREATE|os.O_RDONLY, 0o444); err == nil {
			f.Close()
		}
		src := fmt.Sprintf("/proc/%d/ns/%s", pid, ns)
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			cmd.Process.Kill()
			return fmt.Errorf("bind %s at %s: %w", src, dst, err)
		}
	}
	sb.holder, sb.holderDone = cmd, done
	log.G(ctx).WithFields(log.Fields{"pid": pid, "namespaces": nss}).Info("pod namespaces held")
	return a.configureHolder(pid, nss, hostname, sysctls)
}

// configureHolder sets the hostname and the sysctls in the holder's
// namespaces from a locked thread that joins them and then returns to its
// own (setns changes the calling thread only).
func (a *Agent) configureHolder(pid int, nss []string, hostname string, sysctls map[string]string) error {
	var join []string
	for _, ns := range nss {
		if ns != "pid" { // a pid namespace applies to children only
			join = append(join, ns)
		}
	}
	if len(join) == 0 || (hostname == "" && len(sysctls) == 0) {
		return nil
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored := true
		defer func() {
			// A thread left in the pod's namespaces is not reused: a
			// goroutine that ends locked ends its thread.
			if restored {
				runtime.UnlockOSThread()
			}
		}()
		var orig []*os.File
		for _, ns := range join {
			f, err := os.Open("/proc/thread-self/ns/" + ns)
			if err != nil {
				errc <- err
				return
			}
			defer f.Close()
			orig = append(orig, f)
		}
		errc <- func() error {
			defer func() {
				for _, f := range orig {
					if err := unix.Setns(int(f.Fd()), 0); err != nil {
						restored = false
					}
				}
			}()
			for _, ns := range join {
				f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
				if err != nil {
					return err
				}
				err = unix.Setns(int(f.Fd()), 0)
				f.Close()
				if err != nil {
					return fmt.Errorf("setns %s: %w", ns, err)
				}
			}
			if hostname != "" && contains(join, "uts") {
				if err := unix.Sethostname([]byte(hostname)); err != nil {
					return fmt.Errorf("hostname: %w", err)
				}
			}
			for k, v := range sysctls {
				if err := writeSysctl(k, v); err != nil {
					return err
				}
			}
			return nil
		}()
	}()
	return <-errc
}

// HolderMain is the namespace holder: PID 1 of the pod's pid namespace
// when it has one, so it reaps the orphans of the pod's containers. It
// writes "ready" once it runs and lives until killed.
func HolderMain() {
	sig := make(chan os.Signal, 16)
	signal.Notify(sig, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	if name, err := unix.BytePtrFromString("pause"); err == nil {
		unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(name)), 0, 0, 0)
	}
	os.Stdout.WriteString("ready\n")
	os.Stdout.Close()
	for s := range sig {
		if s != unix.SIGCHLD {
			continue
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
