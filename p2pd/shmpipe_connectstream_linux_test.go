package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// TestShmPipesThroughConnectStreamAreReused runs streams of one yamux session through connectStream with pipe
// files of a real pool, several at once: the client maps each offered file (keeping its mappings, as the Python
// client does), takes or declines it at random, moves random bytes both ways and closes. Every byte must arrive
// in order, the files of cleanly ended streams must be offered again, and no more files may be left than the
// pool keeps.
func TestShmPipesThroughConnectStreamAreReused(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("shared-memory pipes are Linux-only")
	}
	dir := mountSmallTmpfs(t, 200)
	d := &daemon{pipes: shmPipePool{dir: dir}}
	defer d.pipes.close()
	seed := time.Now().UnixNano()
	rng := rand.New(rand.NewSource(seed))
	rawA, rawB := net.Pipe()
	transport := newYamuxTransport()
	daemonSession, err := transport.NewConn(batchedTestConn(rawA, seed+1), false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer daemonSession.Close()
	peerSession, err := transport.NewConn(batchedTestConn(rawB, seed+2), true, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer peerSession.Close()

	var mappingsMu sync.Mutex
	mappings := map[string][]byte{} // the client's mappings, by path
	defer func() {
		for _, mem := range mappings {
			_ = syscall.Munmap(mem)
		}
	}()
	mapFile := func(path string) ([]byte, error) {
		mappingsMu.Lock()
		defer mappingsMu.Unlock()
		if mem, ok := mappings[path]; ok {
			delete(mappings, path) // in use by one stream at a time
			return mem, nil
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return syscall.Mmap(int(f.Fd()), 0, 2*shmRingSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	}
	keepMapping := func(path string, mem []byte) {
		mappingsMu.Lock()
		defer mappingsMu.Unlock()
		mappings[path] = mem
		for path, mem := range mappings {
			if _, err := os.Stat(path); os.IsNotExist(err) { // the daemon dropped it: its memory goes when unmapped
				_ = syscall.Munmap(mem)
				delete(mappings, path)
			}
		}
	}

	offered := map[string]int{}
	var offeredMu, openMu sync.Mutex
	runStream := func(seed int64) error {
		rng := rand.New(rand.NewSource(seed))
		upData, downData := randomBytes(rng, rng.Intn(3*shmRingSize)), randomBytes(rng, rng.Intn(3*shmRingSize))
		openMu.Lock() // streams opened at once may be accepted in another order
		daemonStream, err := daemonSession.OpenStream(context.Background())
		if err != nil {
			openMu.Unlock()
			return err
		}
		peerStream, err := peerSession.AcceptStream()
		openMu.Unlock()
		if err != nil {
			return err
		}
		conns, err := socketpair()
		if err != nil {
			return err
		}
		daemonConn, clientConn := conns[0], conns[1]
		defer clientConn.Close()
		pipe := d.offerShmPipe(daemonConn, true)
		if pipe == nil {
			return errors.New("no pipe offered")
		}
		connected := make(chan struct{})
		go func() {
			defer close(connected)
			d.connectStream(daemonConn, bufio.NewReader(daemonConn), &muxedTestStream{m: daemonStream}, pipe,
				[]byte(pipe.path))
		}()
		clientReader := bufio.NewReader(clientConn)
		info, err := readDelimited(clientReader, 1<<10)
		if err != nil {
			return err
		}
		path := string(info)
		offeredMu.Lock()
		offered[path]++
		offeredMu.Unlock()
		peerDone := make(chan error, 1)
		go func() {
			werr := make(chan error, 1)
			go func() {
				err := writeInPieces(rand.New(rand.NewSource(seed+3)), peerStream, downData)
				if err == nil {
					err = peerStream.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(peerStream)
			if err == nil && !bytes.Equal(got, upData) {
				err = fmt.Errorf("the peer got %d bytes, not the %d the client sent", len(got), len(upData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			peerDone <- err
		}()
		var clientErr error
		if rng.Intn(4) == 0 {
			// plain socket bytes
			if _, err := clientConn.Write([]byte{shmDecline}); err != nil {
				return err
			}
			werr := make(chan error, 1)
			go func() {
				err := writeInPieces(rand.New(rand.NewSource(seed+1)), clientConn, upData)
				if err == nil {
					err = clientConn.(*net.UnixConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(clientReader)
			if err == nil && !bytes.Equal(got, downData) {
				err = fmt.Errorf("the client got %d bytes over its socket, not the %d the peer sent", len(got),
					len(downData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			clientErr = err
			_ = clientConn.Close()
		} else {
			mem, err := mapFile(path)
			if err != nil {
				return err
			}
			if _, err := clientConn.Write([]byte{shmAccept}); err != nil {
				return err
			}
			client := newShmTestClient(clientConn, mem, shmRingSize)
			go client.readRecords()
			werr := make(chan error, 1)
			go func() {
				err := client.write(rand.New(rand.NewSource(seed+1)), upData)
				if err == nil {
					err = client.send(shmRecordEOF, 0)
				}
				werr <- err
			}()
			got, err := client.read(rand.New(rand.NewSource(seed + 2)))
			if err == nil && !bytes.Equal(got, downData) {
				err = fmt.Errorf("the client got %d bytes through the pipe, not the %d the peer sent", len(got),
					len(downData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			clientErr = err
			_ = clientConn.Close()
			keepMapping(path, mem)
		}
		select {
		case err := <-peerDone:
			if err != nil {
				return err
			}
		case <-time.After(20 * time.Second):
			return errors.New("the peer's side did not finish")
		}
		select {
		case <-connected:
		case <-time.After(20 * time.Second):
			return errors.New("connectStream did not return")
		}
		return clientErr
	}

	// at least 3 s and 24 streams: under -race a few rounds fill 3 s, all of them maybe with new pipe files
	start := time.Now()
	streams := 0
	for round := 0; time.Since(start) < 3*time.Second || streams < 24; round++ {
		parallel := 1 + rng.Intn(6)
		errs := make(chan error, parallel)
		for i := 0; i < parallel; i++ {
			s := rng.Int63()
			go func() {
				if err := runStream(s); err != nil {
					errs <- fmt.Errorf("seed %d: %w", s, err)
					return
				}
				errs <- nil
			}()
		}
		for i := 0; i < parallel; i++ {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		streams += parallel
	}
	if len(offered) >= streams {
		t.Fatalf("%d streams were offered %d different pipe files: none was reused", streams, len(offered))
	}
	if names := filesIn(t, dir); len(names) > shmIdlePipes {
		t.Fatalf("%d pipe files are left, the pool keeps %d", len(names), shmIdlePipes)
	}
	t.Logf("%d streams, %d pipe files", streams, len(offered))
}
