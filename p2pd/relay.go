package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	circuitproto "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/proto"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// With -autoRelay=1 the daemon keeps circuit relay v2 reservations itself instead of using go-libp2p's
// autorelay, which waits up to 3 minutes for 4 relay candidates before reserving any, and advertises relays only
// through their public addresses (so never on a LAN or on 127.0.0.1). Here a reservation is taken as soon as a
// relay is known: a -trustedRelays peer, or (with -relayDiscovery=1) any directly connected peer that offers the
// hop protocol, such as the bootstrap peers; more candidates are looked up through the DHT when needed.
const (
	// desiredRelays is how many relays the daemon keeps reservations with.
	desiredRelays = 2
	// relayCheckInterval is how often reservations are checked without another reason to look.
	relayCheckInterval = 15 * time.Second
	// relayRetryBackoff is how long a relay that refused or failed a reservation is left alone.
	relayRetryBackoff = time.Minute
	// relayDiscoveryInterval separates two DHT look-ups for more relay candidates.
	relayDiscoveryInterval = time.Minute
	// relayDiscoveryRetry follows a DHT look-up that failed (typically: the routing table is still empty).
	relayDiscoveryRetry = 2 * time.Second
	// relayDiscoveryTimeout bounds one DHT look-up for relay candidates.
	relayDiscoveryTimeout = 30 * time.Second
	// relayProtectTag keeps the connections to our relays out of the connection manager's trimming.
	relayProtectTag = "hivemind-relay-reservation"
)

// reserveTimeout bounds one reservation request; relayCandidateBudget is how long one update goes on starting
// requests with new relay candidates. A peer that claims the hop protocol but never answers costs reserveTimeout,
// and any number of them may be connected: an update that stops after the budget and runs again at once (renewals
// first) keeps the reservations held renewed in time and replaces a lost one while they are tried. (In
// nanoseconds; tests shorten them.)
var reserveTimeout, relayCandidateBudget atomic.Int64

func init() {
	reserveTimeout.Store(int64(10 * time.Second))
	relayCandidateBudget.Store(int64(30 * time.Second))
}

// relayReservation is one reservation held with a relay.
type relayReservation struct {
	renewAt time.Time
	addrs   []ma.Multiaddr // ours through this relay: <relay addr>/p2p/<relay id>/p2p-circuit
}

// relayKeeper holds reservations with up to desiredRelays relays while this peer is not known to be publicly
// reachable, renews them before they expire, and adds the /p2p-circuit addresses they give to the host's
// addresses (so identify and the DHT pass them on: other peers then dial us through the relay).
type relayKeeper struct {
	d    *daemon
	wake chan struct{}

	mu            sync.Mutex
	reservations  map[peer.ID]*relayReservation
	backoff       map[peer.ID]time.Time
	public        bool
	nextDiscovery time.Time // no DHT look-up for relays before this time (guarded by mu)
}

func newRelayKeeper(d *daemon) *relayKeeper {
	return &relayKeeper{
		d:            d,
		wake:         make(chan struct{}, 1),
		reservations: map[peer.ID]*relayReservation{},
		backoff:      map[peer.ID]time.Time{},
	}
}

// addrsWithRelays is the host's address factory with -autoRelay=1: base addresses, then the circuit ones.
func (k *relayKeeper) addrsWithRelays(addrs []ma.Multiaddr) []ma.Multiaddr {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := append([]ma.Multiaddr(nil), addrs...)
	for _, r := range k.reservations {
		out = append(out, r.addrs...)
	}
	return out
}

// circuitAddrs are the addresses through which peers reach us via relayID: the relay's own addresses (only the
// public ones if it has any, so that private addresses do not leak to the internet; all of them on a LAN),
// each followed by /p2p/<relay id>/p2p-circuit.
func circuitAddrs(relayID peer.ID, relayAddrs []ma.Multiaddr) []ma.Multiaddr {
	suffix, err := ma.NewMultiaddr("/p2p/" + relayID.String() + "/p2p-circuit")
	if err != nil {
		return nil
	}
	var public, all []ma.Multiaddr
	seen := map[string]bool{}
	for _, a := range relayAddrs {
		if a == nil || seen[string(a.Bytes())] {
			continue
		}
		seen[string(a.Bytes())] = true
		if _, err := a.ValueForProtocol(ma.P_CIRCUIT); err == nil {
			continue // an address that is itself relayed cannot carry another hop
		}
		a, _ = ma.SplitFunc(a, func(c ma.Component) bool { return c.Protocol().Code == ma.P_P2P })
		if a == nil {
			continue
		}
		all = append(all, a)
		if manet.IsPublicAddr(a) {
			public = append(public, a)
		}
	}
	if len(public) > 0 {
		all = public
	}
	out := make([]ma.Multiaddr, 0, len(all))
	for _, a := range all {
		out = append(out, a.Encapsulate(suffix))
	}
	return out
}

// run keeps the reservations until the daemon shuts down.
func (k *relayKeeper) run() {
	ctx := k.d.ctx
	sub, err := k.d.host.EventBus().Subscribe([]interface{}{
		new(event.EvtLocalReachabilityChanged),
		new(event.EvtPeerIdentificationCompleted),
		new(event.EvtPeerConnectednessChanged),
	}, eventbus.Name("hivemind relay keeper"))
	if err != nil {
		log.Errorw("relay reservations are off: cannot subscribe to host events", "error", err)
		return
	}
	go func() {
		// a separate reader, so that a slow reservation never holds back the event bus
		defer sub.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-sub.Out():
				if !ok {
					return
				}
				if r, isReachability := ev.(event.EvtLocalReachabilityChanged); isReachability {
					k.mu.Lock()
					k.public = r.Reachability == network.ReachabilityPublic
					k.mu.Unlock()
				}
				k.poke()
			}
		}
	}()
	ticker := time.NewTicker(relayCheckInterval)
	defer ticker.Stop()
	for {
		k.update(ctx)
		select {
		case <-ctx.Done():
			return
		case <-k.wake:
		case <-ticker.C:
		}
	}
}

func (k *relayKeeper) poke() {
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// update drops lost reservations, renews old ones and reserves with new relays until desiredRelays are held,
// starting requests with new relays for relayCandidateBudget at most (then it runs again at once).
func (k *relayKeeper) update(ctx context.Context) {
	h := k.d.host
	now := time.Now()
	changed := false

	k.mu.Lock()
	public := k.public
	renewAt := make(map[peer.ID]time.Time, len(k.reservations))
	for relayID, r := range k.reservations {
		renewAt[relayID] = r.renewAt
	}
	k.mu.Unlock()
	var renew, dropped []peer.ID // the host is asked without k.mu, which its address factory takes
	for relayID, at := range renewAt {
		if public || h.Network().Connectedness(relayID) != network.Connected {
			dropped = append(dropped, relayID)
			h.ConnManager().Unprotect(relayID, relayProtectTag)
			log.Debugw("relay reservation dropped", "relay", relayID, "publiclyReachable", public)
		} else if now.After(at) {
			renew = append(renew, relayID)
		}
	}
	k.mu.Lock()
	for _, relayID := range dropped {
		delete(k.reservations, relayID)
		changed = true
	}
	held := len(k.reservations)
	k.mu.Unlock()

	if !public {
		for _, relayID := range renew {
			if !k.reserve(ctx, peer.AddrInfo{ID: relayID}) {
				k.mu.Lock()
				delete(k.reservations, relayID)
				k.mu.Unlock()
				h.ConnManager().Unprotect(relayID, relayProtectTag)
				held--
				changed = true
			}
		}
		budgetEnd := time.Now().Add(time.Duration(relayCandidateBudget.Load()))
		for _, candidate := range k.candidates(now, desiredRelays-held) {
			if held >= desiredRelays || ctx.Err() != nil {
				break
			}
			if !time.Now().Before(budgetEnd) {
				// the candidates tried are in backoff: the next update, at once, renews and then tries others
				k.poke()
				break
			}
			if k.reserve(ctx, candidate) {
				held++
				changed = true
			}
		}
		if held < desiredRelays {
			k.discover(ctx, now)
		}
	}
	if changed {
		k.signalAddrsChanged()
	}
}

// candidates lists relays to try: the trusted relays first, then (with -relayDiscovery=1) the directly connected
// peers that serve the hop protocol, those connected through a public address first.
func (k *relayKeeper) candidates(now time.Time, wanted int) []peer.AddrInfo {
	if wanted <= 0 {
		return nil
	}
	h := k.d.host
	var public, private []peer.AddrInfo // the host is asked without k.mu, which its address factory takes
	if k.d.cfg.relayDiscovery {
		for _, p := range h.Network().Peers() {
			if protos, err := h.Peerstore().SupportsProtocols(p, circuitproto.ProtoIDv2Hop); err != nil || len(protos) == 0 {
				continue
			}
			direct, publicAddr := false, false
			for _, c := range h.Network().ConnsToPeer(p) {
				if c.Stat().Transient {
					continue
				}
				direct = true
				publicAddr = publicAddr || manet.IsPublicAddr(c.RemoteMultiaddr())
			}
			switch {
			case !direct: // a relay we reach only through another relay is of no use
			case publicAddr:
				public = append(public, peer.AddrInfo{ID: p})
			default:
				private = append(private, peer.AddrInfo{ID: p})
			}
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for relayID, until := range k.backoff { // every relay that ever failed would stay here otherwise
		if !now.Before(until) {
			delete(k.backoff, relayID)
		}
	}
	var out []peer.AddrInfo
	listed := map[peer.ID]bool{}
	for _, info := range append(append(append([]peer.AddrInfo(nil), k.d.cfg.trustedRelays...), public...), private...) {
		_, reserved := k.reservations[info.ID]
		if info.ID != h.ID() && !reserved && !listed[info.ID] && !now.Before(k.backoff[info.ID]) {
			listed[info.ID] = true
			out = append(out, info)
		}
	}
	return out
}

// reserve asks relay for a reservation (a new one or a renewal) and records it; false on failure.
func (k *relayKeeper) reserve(ctx context.Context, relay peer.AddrInfo) bool {
	h := k.d.host
	ctx, cancel := context.WithTimeout(ctx, time.Duration(reserveTimeout.Load()))
	defer cancel()
	res, err := client.Reserve(ctx, streamsEndWithContext{h}, relay)
	if err != nil {
		log.Debugw("relay reservation failed", "relay", relay.ID, "error", err)
		k.mu.Lock()
		k.backoff[relay.ID] = time.Now().Add(relayRetryBackoff)
		k.mu.Unlock()
		return false
	}
	relayAddrs := append([]ma.Multiaddr(nil), res.Addrs...)
	for _, c := range h.Network().ConnsToPeer(relay.ID) {
		if !c.Stat().Transient {
			relayAddrs = append(relayAddrs, c.RemoteMultiaddr())
		}
	}
	relayAddrs = append(relayAddrs, h.Peerstore().Addrs(relay.ID)...)
	now := time.Now()
	// renew when 3/4 of the reservation's lifetime have passed (the relay's default lifetime is one hour)
	renewAt := now.Add(res.Expiration.Sub(now) * 3 / 4)
	h.ConnManager().Protect(relay.ID, relayProtectTag)
	k.mu.Lock()
	k.reservations[relay.ID] = &relayReservation{renewAt: renewAt, addrs: circuitAddrs(relay.ID, relayAddrs)}
	k.mu.Unlock()
	log.Debugw("relay reservation held", "relay", relay.ID, "expires", res.Expiration,
		"limitDuration", res.LimitDuration, "limitData", res.LimitData)
	return true
}

// streamsEndWithContext opens streams that are reset when the context they were opened with ends: client.Reserve
// heeds its context only while opening the stream, and then waits up to client.ReserveTimeout (a minute) for the
// relay's answer, so a peer that claims the hop protocol and never answers would cost a minute, not reserveTimeout.
type streamsEndWithContext struct{ host.Host }

func (h streamsEndWithContext) NewStream(ctx context.Context, p peer.ID, pids ...protocol.ID) (network.Stream, error) {
	s, err := h.Host.NewStream(ctx, p, pids...)
	if err == nil {
		go func() {
			<-ctx.Done() // reserve's context ends when it returns: a stream already closed is left as it is
			_ = s.Reset()
		}()
	}
	return s, err
}

// discover looks up the DHT peers closest to us, at most once per relayDiscoveryInterval (relayDiscoveryRetry
// after a failed look-up): connecting to them makes them candidates once identify reports their protocols.
func (k *relayKeeper) discover(ctx context.Context, now time.Time) {
	if !k.d.cfg.relayDiscovery || k.d.dht == nil {
		return
	}
	k.mu.Lock()
	due := !now.Before(k.nextDiscovery)
	if due {
		k.nextDiscovery = now.Add(relayDiscoveryInterval)
	}
	k.mu.Unlock()
	if !due {
		return
	}
	go func() {
		lookupCtx, cancel := context.WithTimeout(ctx, relayDiscoveryTimeout)
		_, err := k.d.dht.GetClosestPeers(lookupCtx, string(k.d.host.ID()))
		cancel()
		if err != nil {
			log.Debugw("relay discovery: DHT look-up failed", "error", err)
			k.mu.Lock()
			k.nextDiscovery = time.Now().Add(relayDiscoveryRetry)
			k.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-time.After(relayDiscoveryRetry):
			}
		}
		k.poke()
	}()
}

// signalAddrsChanged makes the host announce its new addresses now instead of at its next periodic check.
func (k *relayKeeper) signalAddrsChanged() {
	if s, ok := k.d.addrSignaler.(interface{ SignalAddressChange() }); ok {
		s.SignalAddressChange()
	}
}

// addrsFactory is the host's address factory: the -announceAddrs instead of the listen addresses, followed (with
// -autoRelay=1) by our addresses through relays; nil when neither applies.
func (d *daemon) addrsFactory() func([]ma.Multiaddr) []ma.Multiaddr {
	announce := d.cfg.announceAddrs
	switch {
	case d.relays != nil && len(announce) > 0:
		return func([]ma.Multiaddr) []ma.Multiaddr { return d.relays.addrsWithRelays(announce) }
	case d.relays != nil:
		return d.relays.addrsWithRelays
	case len(announce) > 0:
		return func([]ma.Multiaddr) []ma.Multiaddr { return announce }
	}
	return nil
}
