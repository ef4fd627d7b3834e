package vmm

import (
	"github.com/kuasar-io/resource-slot-sandboxer/agent/transport"
)

// serialDialer dials the agent over its virtio-serial port, whose host
// side is the unix socket QEMU listens on.
func serialDialer(path string) Dialer { return transport.SerialDialer{Path: path} }

var _ Dialer = transport.SerialDialer{}
