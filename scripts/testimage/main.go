// Command testimage is the entrypoint of the tiny e2e test image
// (localhost/resource-slot-test:latest, also tagged as the CRI pause image).
// It prints a line, then sleeps until SIGTERM/SIGINT and exits 0.
// It is its own module so the main module's `go test ./...` skips it.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	fmt.Printf("resource-slot-test: started pid=%d args=%q\n", os.Getpid(), strings.Join(os.Args[1:], " "))
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	s := <-sigs
	fmt.Printf("resource-slot-test: got %v, exiting\n", s)
}
