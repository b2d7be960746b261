//go:build !faultinject

// Package fault marks the points between the durable steps of a bootstrap
// where a test build (the faultinject build tag) can kill the process, as
// a power cut would. In normal builds every point is a no-op the compiler
// removes.
package fault

// Point is a place where a test build may crash.
func Point(string) {}
