//go:build !linux

package main

import "errors"

func createShmPipeFile(ringSize int) (*shmPipeFile, error) {
	return nil, errors.New("shared-memory stream pipes are only supported on Linux")
}

func unmapShm(mem []byte) {}
