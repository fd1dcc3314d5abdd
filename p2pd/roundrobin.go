package main

import (
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// roundRobin is a list of handler endpoints served in turn; callers hold daemon.mu.
type roundRobin[T comparable] struct {
	items []T
	next  int
}

func (r *roundRobin[T]) add(item T) {
	r.items = append(r.items, item)
}

// remove deletes one occurrence of item and reports whether it was there.
func (r *roundRobin[T]) remove(item T) bool {
	for i, existing := range r.items {
		if existing == item {
			r.items = append(r.items[:i], r.items[i+1:]...)
			if r.next > i {
				r.next--
			}
			return true
		}
	}
	return false
}

func (r *roundRobin[T]) len() int { return len(r.items) }

// pick returns the next endpoint in turn; the list must not be empty.
func (r *roundRobin[T]) pick() T {
	if r.next >= len(r.items) {
		r.next = 0
	}
	item := r.items[r.next]
	r.next++
	return item
}

// addHandler appends item to the handlers of pid; the first handler of a protocol makes the host accept it.
// Callers hold daemon.mu.
func addHandler[T comparable](d *daemon, table map[protocol.ID]*roundRobin[T], pid protocol.ID, item T,
	accept network.StreamHandler) {
	handlers, ok := table[pid]
	if !ok {
		handlers = &roundRobin[T]{}
		table[pid] = handlers
		d.host.SetStreamHandler(pid, accept)
	}
	handlers.add(item)
}

// dropIfUnused forgets pid once its last handler is removed, and the host stops accepting the protocol (unless the
// daemon is closing anyway). Callers hold daemon.mu.
func dropIfUnused[T comparable](d *daemon, table map[protocol.ID]*roundRobin[T], pid protocol.ID) {
	if handlers, ok := table[pid]; ok && handlers.len() == 0 {
		delete(table, pid)
		if !d.closing {
			d.host.RemoveStreamHandler(pid)
		}
	}
}
