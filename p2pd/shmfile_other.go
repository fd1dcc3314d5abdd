//go:build !linux

package main

import (
	"errors"
	"net"
)

func createShmPipeFile(dir string, ringSize int) (*shmPipeFile, error) {
	return nil, errors.New("shared-memory stream pipes are only supported on Linux")
}

func shmKeepsSpare(dir string) bool { return false }

func removeStaleShmPipeFiles(dir string) {}

func unmapShm(mem []byte) {}

func shmPeerIsOurUser(conn *net.UnixConn) bool { return false }
