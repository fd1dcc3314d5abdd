package main

// How the rest of the network finds and reaches peers that are reachable only through a relay: the relay service
// records their circuit addresses, and the DHT keeps away from them (relay.go holds the reservations themselves).

import (
	"fmt"
	"net"
	"sync"
	"time"

	kad "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// hasDirectConn reports whether we have a connection to p that does not go through a relay.
func hasDirectConn(h host.Host, p peer.ID) bool {
	for _, c := range h.Network().ConnsToPeer(p) {
		if !c.Stat().Transient {
			return true
		}
	}
	return false
}

// dhtRelayFilters keep the DHT away from peers it could only reach through a relay: its own requests may not use
// such limited connections, so a request to them waits (10 s and more) for a direct connection that never comes,
// and meanwhile holds the DHT's one request channel to that peer, which also stalls our look-up of that very peer
// (made with permission to use relays) when a stream to it is opened. Such peers are not added to the routing
// table, and not queried in look-ups unless they are the peer looked for.
func dhtRelayFilters() []kad.Option {
	return []kad.Option{kad.RoutingTableFilter(relayOnlyRTFilter), kad.QueryFilter(relayOnlyQueryFilter)}
}

// relayOnlyRTFilter admits to the routing table only peers we have a direct connection to.
func relayOnlyRTFilter(dhtInstance interface{}, p peer.ID) bool {
	return hasDirectConn(dhtInstance.(*kad.IpfsDHT).Host(), p)
}

// relayOnlyQueryFilter lets a look-up query a peer unless all its known addresses are relayed and we have no
// direct connection to it.
func relayOnlyQueryFilter(dhtInstance interface{}, info peer.AddrInfo) bool {
	if len(info.Addrs) == 0 || hasDirectConn(dhtInstance.(*kad.IpfsDHT).Host(), info.ID) {
		return true
	}
	for _, a := range info.Addrs {
		if _, err := a.ValueForProtocol(ma.P_CIRCUIT); err != nil {
			return true // an address that is not relayed
		}
	}
	return false
}

const (
	// reservationHintTTL is the lifetime of the addresses a relay records for the peers holding a reservation with
	// it; a TTL of its own, which identify's replacement of a peer's addresses leaves alone.
	reservationHintTTL = 59 * time.Minute
	// reservationHintInterval is how often those addresses are checked and restored.
	reservationHintInterval = 2 * time.Second
	// relayGrantsPerHeld: go-libp2p's relay refuses reservations once relayGrantsPerHeld * -relayMaxReservations
	// were granted in the last 30 minutes, held or not (from one IP address: a quarter of that), so its limits
	// (set in startRelayService) only bound the rate of new ones; reservationHints limits those held at once.
	relayGrantsPerHeld = 8
	// relaySourceShare: the peers of one public IPv4 address or IPv6 /64 network hold at most
	// 1/relaySourceShare of the -relayMaxReservations slots.
	relaySourceShare = 4
)

// reservationHint is a peer holding a reservation with our relay service.
type reservationHint struct {
	expiry time.Time // when the reservation expires unless renewed
	source string    // the public IPv4 address or IPv6 /64 network it reserved from; "" for a private one
}

// reservationHints is the relay service's side: it admits reservations and notes who holds one. A peer that
// reserves a slot is reachable through us, so we record <our address>/p2p/<our id>/p2p-circuit among its
// addresses, and our DHT gives them to peers looking it up. The peer announces the same addresses itself, but
// identify replaces a peer's addresses with those of each message it receives, and two messages of the peer sent
// just before and after its addresses changed may be handled in either order: the peer would then stay unknown to
// the DHT until its addresses change again.
type reservationHints struct {
	d         *daemon
	maxHeld   int // -relayMaxReservations
	maxSource int // reservations held from one public source
	mu        sync.Mutex
	peers     map[peer.ID]reservationHint
}

// startReservationHints returns the relay's ACL and keeps the hint addresses until the daemon shuts down.
func (d *daemon) startReservationHints() *reservationHints {
	maxHeld := d.cfg.relayMaxReservations
	maxSource := maxHeld / relaySourceShare
	if maxSource < 1 {
		maxSource = 1
	}
	hints := &reservationHints{d: d, maxHeld: maxHeld, maxSource: maxSource, peers: map[peer.ID]reservationHint{}}
	go hints.run()
	return hints
}

// reservationSource is the public IPv4 address or IPv6 /64 network of a; "" for any other address.
func reservationSource(a ma.Multiaddr) string {
	if a == nil || !manet.IsPublicAddr(a) {
		return ""
	}
	ip, err := manet.ToIP(a)
	if err != nil {
		return ""
	}
	if ip4 := ip.To4(); ip4 != nil {
		return ip4.String()
	}
	return ip.Mask(net.CIDRMask(64, 128)).String()
}

// AllowReserve admits a reservation (see admit) and records the hint at once.
func (r *reservationHints) AllowReserve(p peer.ID, a ma.Multiaddr) bool {
	r.forgetDisconnected()
	if !r.admit(p, reservationSource(a)) {
		return false
	}
	r.d.host.Peerstore().AddAddrs(p, r.ownCircuitAddrs(), reservationHintTTL)
	return true
}

// admit notes p as holding a reservation: a renewal, or a new reservation while fewer than -relayMaxReservations
// peers hold one (peers that left freed theirs) and fewer than a quarter of them reserved from the same public
// source; false when refused.
func (r *reservationHints) admit(p peer.ID, source string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, renewing := r.peers[p]; !renewing {
		fromSource := 0
		for _, h := range r.peers {
			if source != "" && h.source == source {
				fromSource++
			}
		}
		if len(r.peers) >= r.maxHeld || fromSource >= r.maxSource {
			log.Debugw("relay reservation refused", "peer", p, "held", len(r.peers), "fromSameAddress", fromSource)
			return false
		}
	}
	r.peers[p] = reservationHint{expiry: time.Now().Add(reservationHintTTL), source: source}
	return true
}

// AllowConnect admits every relayed connection.
func (r *reservationHints) AllowConnect(peer.ID, ma.Multiaddr, peer.ID) bool { return true }

func (r *reservationHints) ownCircuitAddrs() []ma.Multiaddr {
	return circuitAddrs(r.d.host.ID(), r.d.host.Addrs())
}

// forgetDisconnected drops the peers that no longer hold a reservation (the relay drops the reservation of a peer
// that disconnects) and the circuit addresses recorded for them.
func (r *reservationHints) forgetDisconnected() {
	now, h := time.Now(), r.d.host
	r.mu.Lock()
	peers := make(map[peer.ID]reservationHint, len(r.peers))
	for p, hint := range r.peers {
		peers[p] = hint
	}
	r.mu.Unlock()
	var own []ma.Multiaddr
	for p, hint := range peers { // the host is asked without r.mu
		if now.Before(hint.expiry) && h.Network().Connectedness(p) == network.Connected {
			continue
		}
		r.mu.Lock()
		if r.peers[p] == hint {
			delete(r.peers, p)
		}
		r.mu.Unlock()
		if own == nil {
			own = r.ownCircuitAddrs()
		}
		h.Peerstore().SetAddrs(p, own, 0)
	}
}

func (r *reservationHints) run() {
	ticker := time.NewTicker(reservationHintInterval)
	defer ticker.Stop()
	for {
		select {
		case <-r.d.ctx.Done():
			return
		case <-ticker.C:
		}
		r.forgetDisconnected()
		own := r.ownCircuitAddrs()
		r.mu.Lock()
		peers := make([]peer.ID, 0, len(r.peers))
		for p := range r.peers {
			peers = append(peers, p)
		}
		r.mu.Unlock()
		for _, p := range peers {
			r.d.host.Peerstore().AddAddrs(p, own, reservationHintTTL)
		}
	}
}

// checkRelayServiceOptions validates the relay service's -relay* limits: each must be positive (a buffer of 0
// bytes would make every relayed connection spin on empty reads; 0 for the others refuses or cuts everything).
func checkRelayServiceOptions(o *options) error {
	for _, l := range []struct {
		name  string
		value int64
	}{
		{"relayMaxCircuits", int64(o.relayMaxCircuits)},
		{"relayMaxReservations", int64(o.relayMaxReservations)},
		{"relayBufferSize", int64(o.relayBufferSize)},
		{"relayDataLimit", o.relayDataLimit},
		{"relayTimeLimit", int64(o.relayTimeLimit)},
	} {
		if l.value <= 0 {
			return fmt.Errorf("-%s must be positive, got %d (use -relayService=0 to stop relaying)", l.name, l.value)
		}
	}
	return nil
}
