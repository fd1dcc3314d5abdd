package main

import (
	"os"
	"strconv"
	"time"
)

// parentPIDEnv names the process that started the daemon: hivemind sets it when it starts one for a P2P object.
const parentPIDEnv = "HIVEMIND_P2PD_PARENT_PID"

// parentPollInterval is how often the daemon checks that the process that started it is still there.
const parentPollInterval = 500 * time.Millisecond

// watchParent returns a channel that is closed once the process named by HIVEMIND_P2PD_PARENT_PID (the one that
// started the daemon) has ended, however it ended: its persistent connection is not enough, since a process forked
// from it (a DataLoader worker, a plain os.fork) keeps a copy of that socket open for as long as it lives. It returns
// nil (never ready) when the variable is not set, or names a process that is not our parent (a wrapper started us).
func watchParent() <-chan struct{} {
	pid, err := strconv.Atoi(os.Getenv(parentPIDEnv))
	if err != nil || pid <= 1 || os.Getppid() != pid {
		return nil
	}
	gone := make(chan struct{})
	go func() {
		ticker := time.NewTicker(parentPollInterval)
		defer ticker.Stop()
		for range ticker.C {
			if os.Getppid() != pid { // orphans are handed to another process (init or a subreaper)
				close(gone)
				return
			}
		}
	}()
	return gone
}
