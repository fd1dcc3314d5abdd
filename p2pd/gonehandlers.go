package main

import (
	"errors"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// A client that registered stream handlers and then went away without removing them (its process was killed, or
// it shut down while sharing a daemon it did not start) would otherwise keep them forever: every incoming stream
// sent its way is reset, and no other client can register the same protocol again ("already set"). The daemon
// forgets such a client once its callback address provably has nobody behind it.

// probeTimeout bounds a probe of a registered client's callback address before a conflicting registration.
const probeTimeout = time.Second

// clientGone reports whether a dial of a client's callback address failed because nobody can ever answer there:
// the socket file is gone, or nobody listens on it. Timeouts and other errors may be transient and do not count.
func clientGone(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}

// forgetStreamClient removes every stream handler registered at callback address key. Callers hold daemon.mu.
func (d *daemon) forgetStreamClient(key string) {
	for pid, handlers := range d.streamHandlers {
		for handlers.remove(key) {
		}
		dropIfUnused(d, d.streamHandlers, pid)
	}
	delete(d.shmClients, key)
}

// pruneGoneStreamClients probes the clients that serve any of protos as stream handlers and forgets those that are
// gone. It dials without holding daemon.mu; a live client sees a connection that closes before its StreamInfo.
func (d *daemon) pruneGoneStreamClients(protos []string) {
	d.mu.Lock()
	var keys []string
	seen := map[string]bool{}
	for _, p := range protos {
		if handlers, ok := d.streamHandlers[protocol.ID(p)]; ok {
			for _, key := range handlers.items {
				if !seen[key] {
					seen[key] = true
					keys = append(keys, key)
				}
			}
		}
	}
	d.mu.Unlock()
	for _, key := range keys {
		addr, err := ma.NewMultiaddrBytes([]byte(key))
		if err != nil {
			continue
		}
		conn, err := dialClient(addr, probeTimeout)
		if err == nil {
			_ = conn.Close()
			continue
		}
		if clientGone(err) {
			log.Infow("forgetting the stream handlers of a client that is gone", "handler", addr, "error", err)
			d.mu.Lock()
			d.forgetStreamClient(key)
			d.mu.Unlock()
		}
	}
}
