package main

// Dial backoff. After a failed dial, go-libp2p's swarm refuses further dials to the same address ("dial backoff")
// for BackoffBase + BackoffCoef*n² (n: earlier failures), by default 5 s + 1 s*n², up to 5 minutes. A peer that
// was down for a while (an expert server, an averaging peer, a DHT node) and restarts on the same identity and
// address then stays unreachable for seconds to minutes after it is back. This daemon bounds that backoff
// (-dialBackoffBase, -dialBackoffMax) and lets a request of its client (CONNECT, STREAM_OPEN, a unary call) dial
// again once -dialBackoffBase has passed since the last such request to that peer failed to dial, whatever
// backoff libp2p's background dials (DHT refresh, identify) have built up. See README.md ("Dial backoff").

import (
	"context"
	"flag"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
)

const (
	// defaultDialBackoffBase is how long a failed address is not dialled again (libp2p: 5 s).
	defaultDialBackoffBase = time.Second
	// defaultDialBackoffMax caps the backoff of an address that keeps failing (libp2p: 5 minutes).
	defaultDialBackoffMax = 10 * time.Second
	// redialPruneAt is how many remembered failures trigger dropping those older than the base.
	redialPruneAt = 1024
)

func addDialBackoffFlags(fs *flag.FlagSet, o *options) {
	fs.DurationVar(&o.dialBackoffBase, "dialBackoffBase", defaultDialBackoffBase,
		"after a failed dial, an address is not dialled again for base*(1+n^2) (n: earlier failures), up to "+
			"-dialBackoffMax; a request of the client dials again after base (0: no backoff)")
	fs.DurationVar(&o.dialBackoffMax, "dialBackoffMax", defaultDialBackoffMax,
		"the longest dial backoff of an address that keeps failing")
}

func checkDialBackoffOptions(o *options) error {
	if o.dialBackoffBase < 0 {
		return fmt.Errorf("-dialBackoffBase must not be negative, got %s", o.dialBackoffBase)
	}
	if o.dialBackoffMax <= 0 || o.dialBackoffMax < o.dialBackoffBase {
		return fmt.Errorf("-dialBackoffMax must be positive and at least -dialBackoffBase (%s), got %s",
			o.dialBackoffBase, o.dialBackoffMax)
	}
	return nil
}

// applyDialBackoff sets go-libp2p's backoff schedule (package variables of the swarm, read at every failed dial;
// BackoffMax is also the period of its clean-up, fixed when a swarm starts) to base*(1+n²), capped at longest.
func applyDialBackoff(base, longest time.Duration) {
	if swarm.BackoffBase == base && swarm.BackoffCoef == base && swarm.BackoffMax == longest {
		return // unchanged: no write that the swarms already running in this process (tests) would race with
	}
	swarm.BackoffBase = base
	swarm.BackoffCoef = base
	swarm.BackoffMax = longest
}

// redialHost is the host as the daemon's own requests see it: before it dials a peer it is not connected to, it
// clears that peer's dial backoff unless a dial of its own to that peer failed less than base ago. So the
// client's requests dial a dead peer at most about once per base (requests in between fail at once with "dial
// backoff"), and reach a restarted peer within base of its return. Dials that libp2p makes by itself still follow
// the swarm's growing backoff.
type redialHost struct {
	host.Host
	backoff *swarm.DialBackoff
	base    time.Duration
	now     func() time.Time

	mu     sync.Mutex
	failed map[peer.ID]time.Time // when a dial of ours to the peer last failed
}

// newRedialHost wraps h; it returns h itself when there is no backoff to clear.
func newRedialHost(h host.Host, base time.Duration) host.Host {
	sw, ok := h.Network().(*swarm.Swarm)
	if !ok || base <= 0 {
		return h
	}
	return &redialHost{Host: h, backoff: sw.Backoff(), base: base, now: time.Now, failed: map[peer.ID]time.Time{}}
}

func (h *redialHost) Connect(ctx context.Context, pi peer.AddrInfo) error {
	fresh := h.beforeDial(pi.ID)
	err := h.Host.Connect(ctx, pi)
	h.afterDial(pi.ID, fresh, err)
	return err
}

func (h *redialHost) NewStream(ctx context.Context, p peer.ID, pids ...protocol.ID) (network.Stream, error) {
	fresh := h.beforeDial(p)
	s, err := h.Host.NewStream(ctx, p, pids...)
	h.afterDial(p, fresh, err)
	return s, err
}

// beforeDial clears p's backoff when no dial of ours to p failed within the base; true when it did.
func (h *redialHost) beforeDial(p peer.ID) bool {
	if h.Network().Connectedness(p) == network.Connected {
		return false
	}
	h.mu.Lock()
	failedAt, ok := h.failed[p]
	fresh := !ok || h.now().Sub(failedAt) >= h.base
	h.mu.Unlock()
	if fresh {
		h.backoff.Clear(p)
	}
	return fresh
}

// afterDial remembers a failed fresh dial (a request refused by the backoff leaves the time of the last real
// failure), and forgets p once it is connected.
func (h *redialHost) afterDial(p peer.ID, fresh bool, err error) {
	connected := err == nil || h.Network().Connectedness(p) == network.Connected
	h.mu.Lock()
	defer h.mu.Unlock()
	if connected {
		delete(h.failed, p)
		return
	}
	if !fresh {
		return
	}
	now := h.now()
	if len(h.failed) >= redialPruneAt {
		for q, at := range h.failed {
			if now.Sub(at) >= h.base {
				delete(h.failed, q)
			}
		}
	}
	h.failed[p] = now
}
