// containerd-dropin adds the sandboxer's proxy plugins and runtime
// handlers to an existing containerd 2.x through a drop-in file that its
// config.toml imports, and removes them again (package internal/dropin).
// make install and make uninstall run it:
//
//	go run ./scripts/containerd-dropin install [flags]
//	go run ./scripts/containerd-dropin uninstall [flags]
//
// containerd reads the drop-in when it starts: restart it afterwards.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/kuasar-io/resource-slot-sandboxer/internal/dropin"
)

func main() {
	fs := flag.NewFlagSet("containerd-dropin", flag.ExitOnError)
	root := fs.String("root", "", "prefix of every file read or written (DESTDIR)")
	config := fs.String("config", "/etc/containerd/config.toml", "containerd's configuration")
	file := fs.String("dropin", "/etc/containerd/conf.d/resource-slot.toml", "the drop-in")
	slot := fs.String("slot-socket", "/run/resource-slot-sandboxer.sock", "socket of the slot daemon (kuasar-resource-slot.service)")
	vm := fs.String("vm-socket", "/run/resource-vm-sandboxer.sock", "socket of the vm daemon (kuasar-resource-vm.service)")
	shim := fs.String("shim", "/usr/local/bin/containerd-shim-resource-slot-v1", "the task shim binary (runtime_path)")
	if len(os.Args) < 2 || (os.Args[1] != "install" && os.Args[1] != "uninstall") {
		fmt.Fprintln(os.Stderr, "usage: containerd-dropin install|uninstall [flags]")
		fs.PrintDefaults()
		os.Exit(2)
	}
	fs.Parse(os.Args[2:])
	o := dropin.Options{Root: *root, Config: *config, Dropin: *file}
	var (
		did []string
		err error
	)
	if os.Args[1] == "install" {
		did, err = dropin.Install(o, dropin.Content(*slot, *vm, *shim))
	} else {
		did, err = dropin.Uninstall(o)
	}
	for _, d := range did {
		fmt.Println("containerd-dropin:", d)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "containerd-dropin:", err)
		os.Exit(1)
	}
	if len(did) > 0 && *root == "" {
		fmt.Println("containerd-dropin: restart containerd to apply it")
	}
}
