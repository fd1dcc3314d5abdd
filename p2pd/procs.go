package main

import (
	"os"
	"runtime"
)

// The daemon relays bytes between local clients and peers; it shares the machine with the Python processes
// that use it. With one scheduler thread per core, every goroutine hand-off of a small RPC wakes an idle thread
// that spins looking for work (futex and nanosleep calls cost more CPU than the RPC itself), and large
// transfers gain little from more than a few threads. So unless GOMAXPROCS is set in the environment, the
// daemon runs a quarter of the machine's cores as scheduler threads, at least 1 and at most 4.
const maxDefaultProcs = 4

// defaultProcs is the number of scheduler threads for a machine with ncpu cores.
func defaultProcs(ncpu int) int {
	procs := ncpu / 4
	if procs < 1 {
		return 1
	}
	if procs > maxDefaultProcs {
		return maxDefaultProcs
	}
	return procs
}

// limitSchedulerThreads applies defaultProcs unless the user chose GOMAXPROCS.
func limitSchedulerThreads() {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	runtime.GOMAXPROCS(defaultProcs(runtime.NumCPU()))
}
