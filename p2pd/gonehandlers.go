package main

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// A client that registered stream handlers and then went away without removing them (its process was killed, or
// it shut down while sharing a daemon it did not start) would otherwise keep them forever: every incoming stream
// sent its way is reset, and no other client can register the same protocol again ("already set"). The daemon
// forgets such a client once its callback address provably has nobody behind it.

// goneClientsSweepInterval (a time.Duration) is how often the daemon forgets the stream handlers of clients whose
// unix socket file is gone: a client that was killed and whose protocols nobody calls or registers again would
// otherwise stay registered for the daemon's life (a killed process leaves its file, which the next hivemind peer
// started on the machine sweeps away). Only the files are looked at: live clients are not disturbed.
var goneClientsSweepInterval atomic.Int64

func init() { goneClientsSweepInterval.Store(int64(time.Minute)) }

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

// streamHolderError refuses a registration of proto, which live stream handlers (handlers) serve, naming the first
// of them and what to do; callers hold daemon.mu.
func streamHolderError(proto string, handlers *roundRobin[string], hint string) string {
	holder := "?"
	if len(handlers.items) > 0 {
		if addr, err := ma.NewMultiaddrBytes([]byte(handlers.items[0])); err == nil {
			holder = addr.String()
		}
	}
	return fmt.Sprintf("handler for protocol %s already set: it is the stream handler of another client, at %s, "+
		"which is alive; %s", proto, holder, hint)
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

// sweepGoneStreamClientsForever forgets, every goneClientsSweepInterval until the daemon stops, the stream handlers
// registered at unix socket paths that no longer exist.
func (d *daemon) sweepGoneStreamClientsForever() {
	ticker := time.NewTicker(time.Duration(goneClientsSweepInterval.Load()))
	defer ticker.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-ticker.C:
		}
		d.mu.Lock()
		paths := map[string]string{} // key -> its unix path
		for _, handlers := range d.streamHandlers {
			for _, key := range handlers.items {
				if addr, err := ma.NewMultiaddrBytes([]byte(key)); err == nil {
					if path, err := addr.ValueForProtocol(ma.P_UNIX); err == nil {
						paths[key] = path
					}
				}
			}
		}
		d.mu.Unlock()
		for key, path := range paths {
			if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
				log.Infow("forgetting the stream handlers of a client whose socket is gone", "path", path)
				d.mu.Lock()
				d.forgetStreamClient(key)
				d.mu.Unlock()
			}
		}
	}
}
