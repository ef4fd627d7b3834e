package resourceinfo

// Allocation is what a sandbox holds of a node for accounting: per
// resource its limit, or its request when it has no limit, or nothing.
// Admission control compares it with the node's capacity and cost
// estimation charges for it.
type Allocation struct {
	CPU     float64 `json:"cpu"`     // cores
	Memory  int64   `json:"memory"`  // bytes
	Pids    int64   `json:"pids"`    // count
	Storage int64   `json:"storage"` // bytes
}

// Allocation of the effective values.
func (r Resources) Allocation() Allocation {
	var a Allocation
	switch {
	case r.CPULimit != nil:
		a.CPU = *r.CPULimit
	case r.CPURequest != nil:
		a.CPU = *r.CPURequest
	}
	switch {
	case r.MemoryLimit != nil:
		a.Memory = *r.MemoryLimit
	case r.MemoryRequest != nil:
		a.Memory = *r.MemoryRequest
	}
	if r.PidLimit != nil {
		a.Pids = *r.PidLimit
	}
	if r.StorageLimit != nil {
		a.Storage = *r.StorageLimit
	}
	return a
}
