package sandboxer

import "github.com/kuasar-io/resource-slot-sandboxer/backend"

// Backend realizes sandboxes and runs their containers: the slot
// simulation (package slot) or one VM per sandbox (package vmm). The
// controller owns the API, the records and their persistence; see package
// backend for the contract.
type Backend = backend.Backend

// ExitFunc reports that a sandbox stopped by itself.
type ExitFunc = backend.ExitFunc
