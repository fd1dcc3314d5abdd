package main

import (
	"os"
	"runtime"
	"sync"
	"testing"
)

func TestShmRecordsAreValidated(t *testing.T) {
	p := &shmPipe{size: 100}
	p.changed = sync.NewCond(&p.mu)
	steps := []struct {
		kind byte
		n    uint64
		ok   bool
	}{
		{shmRecordData, 0, false},   // empty announcement
		{shmRecordData, 101, false}, // more than the ring
		{shmRecordData, 60, true},
		{shmRecordData, 41, false}, // 60 + 41 unacknowledged bytes do not fit
		{shmRecordData, 40, true},
		{shmRecordAck, 1, false}, // nothing was sent to the client
		{'X', 1, false},
		{shmRecordEOF, 0, true},
		{shmRecordData, 1, false}, // data after the end
	}
	for i, step := range steps {
		err := p.applyRecord(step.kind, step.n)
		if (err == nil) != step.ok {
			t.Fatalf("step %d (%q %d): error %v, expected ok=%v", i, step.kind, step.n, err, step.ok)
		}
	}
	if p.upAvail != 100 || p.upUnacked != 100 || !p.upEnded {
		t.Fatalf("unexpected state after the records: %+v", p)
	}
	p.downUnacked = 10
	if err := p.applyRecord(shmRecordAck, 11); err == nil {
		t.Fatal("an acknowledgement of more than was sent must fail")
	}
	if err := p.applyRecord(shmRecordAck, 10); err != nil || p.downUnacked != 0 {
		t.Fatalf("acknowledging what was sent: %v, %d left", err, p.downUnacked)
	}
}

func TestShmPipePoolReusesAndRemovesFiles(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("shared-memory pipes are Linux-only")
	}
	var pool shmPipePool
	first, err := pool.get()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.mem) != 2*shmRingSize {
		t.Fatalf("pipe memory is %d bytes", len(first.mem))
	}
	first.mem[0], first.mem[len(first.mem)-1] = 1, 2
	pool.put(first)
	again, err := pool.get()
	if err != nil || again != first {
		t.Fatalf("an idle pipe must be reused: %v", err)
	}
	second, err := pool.get()
	if err != nil || second == first {
		t.Fatalf("a pipe in use must not be handed out twice: %v", err)
	}
	pool.put(second)
	pool.close() // removes every file, releases the idle one; the one in use keeps its memory until released
	for _, pipe := range []*shmPipeFile{first, second} {
		if _, err := os.Stat(pipe.path); !os.IsNotExist(err) {
			t.Fatalf("%s still exists after close: %v", pipe.path, err)
		}
	}
	if first.mem[len(first.mem)-1] != 2 {
		t.Fatal("the memory of a pipe in use must stay mapped")
	}
	pool.put(first) // after close: released at once
	if first.mem != nil {
		t.Fatal("a pipe put back after close must be released")
	}
	if _, err := pool.get(); err == nil {
		t.Fatal("a closed pool must not create pipes")
	}
}
