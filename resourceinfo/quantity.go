package resourceinfo

import "k8s.io/apimachinery/pkg/api/resource"

// ParseQuantity parses a non-negative Kubernetes quantity that comes from
// outside (an annotation, a request), with the guards every such value
// needs: a length bound, a bound on the decimal exponent (ParseQuantity
// computes with 10^exponent, so "1e30000000" costs seconds of CPU) and no
// unit without a number. key names the value in the error, which wraps
// errdefs.ErrInvalidArgument.
func ParseQuantity(key, value string) (resource.Quantity, error) {
	return parseQuantity(key, value)
}

// ParseWholeQuantity is ParseQuantity for a whole number that fits int64
// (bytes, a count).
func ParseWholeQuantity(key, value string) (int64, error) {
	return parseInt64Quantity(key, value)
}
