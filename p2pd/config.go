package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// config is the validated form of the command line: every address parsed, the identity loaded.
type config struct {
	*options
	listenAddr     ma.Multiaddr
	hostAddrs      []ma.Multiaddr
	announceAddrs  []ma.Multiaddr
	bootstrapPeers []peer.AddrInfo // from -bootstrapPeers; empty = the public IPFS peers when -b=1
	trustedRelays  []peer.AddrInfo
	identity       crypto.PrivKey // nil = a fresh key for this run
	dhtMode        string         // "", "auto", "client" or "server"
}

func parseMultiaddrList(flagName, value string) ([]ma.Multiaddr, error) {
	if value == "" {
		return nil, nil
	}
	var addrs []ma.Multiaddr
	for _, s := range strings.Split(value, ",") {
		s = strings.TrimSpace(s)
		addr, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("invalid multiaddr %q in -%s: %v", s, flagName, err)
		}
		addrs = append(addrs, addr)
	}
	return addrs, nil
}

func parsePeerList(flagName, value string) ([]peer.AddrInfo, error) {
	addrs, err := parseMultiaddrList(flagName, value)
	if err != nil {
		return nil, err
	}
	infos := make([]peer.AddrInfo, 0, len(addrs))
	for _, addr := range addrs {
		info, err := peer.AddrInfoFromP2pAddr(addr)
		if err != nil {
			return nil, fmt.Errorf("invalid peer address %q in -%s (it must end with /p2p/<peer id>): %v",
				addr, flagName, err)
		}
		infos = append(infos, *info)
	}
	// several addresses of one peer become one AddrInfo
	merged := make([]peer.AddrInfo, 0, len(infos))
	index := map[peer.ID]int{}
	for _, info := range infos {
		if i, ok := index[info.ID]; ok {
			merged[i].Addrs = append(merged[i].Addrs, info.Addrs...)
			continue
		}
		index[info.ID] = len(merged)
		merged = append(merged, info)
	}
	return merged, nil
}

func readIdentity(path string) (crypto.PrivKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read identity file (-id): %v", err)
	}
	key, err := crypto.UnmarshalPrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("invalid identity file %s (expected a serialized crypto.pb.PrivateKey): %v", path, err)
	}
	return key, nil
}

func buildConfig(o *options) (*config, error) {
	c := &config{options: o}
	var err error
	if c.listenAddr, err = ma.NewMultiaddr(o.listen); err != nil {
		return nil, fmt.Errorf("invalid multiaddr %q in -listen: %v", o.listen, err)
	}
	if c.hostAddrs, err = parseMultiaddrList("hostAddrs", o.hostAddrs); err != nil {
		return nil, err
	}
	if c.announceAddrs, err = parseMultiaddrList("announceAddrs", o.announceAddrs); err != nil {
		return nil, err
	}
	if c.bootstrapPeers, err = parsePeerList("bootstrapPeers", o.bootstrapPeers); err != nil {
		return nil, err
	}
	if c.trustedRelays, err = parsePeerList("trustedRelays", o.trustedRelays); err != nil {
		return nil, err
	}
	if len(c.trustedRelays) > 0 && !o.relay {
		return nil, errors.New("-trustedRelays requires -relay=1")
	}
	if len(c.trustedRelays) > 0 && !o.autoRelay {
		return nil, errors.New("-trustedRelays requires -autoRelay=1")
	}
	if o.autoRelay && !o.relayDiscovery && len(c.trustedRelays) == 0 {
		return nil, errors.New("-autoRelay=1 requires either -relayDiscovery=1 or -trustedRelays=<relay addrs>")
	}
	if o.forceReachabilityPublic && o.forceReachabilityPrivate {
		return nil, errors.New("-forceReachabilityPublic and -forceReachabilityPrivate are mutually exclusive")
	}
	if !o.noise && !o.tls {
		return nil, errors.New("at least one channel security protocol must be enabled (-noise=1 or -tls=1)")
	}
	if o.muxer != "yamux" {
		return nil, fmt.Errorf("unsupported -muxer=%q (only yamux is available)", o.muxer)
	}
	if o.pubsub {
		return nil, errors.New("-pubsub=1 is not supported by this daemon")
	}
	if o.persistentConnMaxMsgSize <= 0 {
		return nil, fmt.Errorf("-persistentConnMaxMsgSize must be positive, got %d", o.persistentConnMaxMsgSize)
	}
	if err := checkLimitOptions(o); err != nil {
		return nil, err
	}
	if err := checkRelayServiceOptions(o); err != nil {
		return nil, err
	}
	if err := checkDialBackoffOptions(o); err != nil {
		return nil, err
	}
	if o.idleTimeout < 0 {
		return nil, fmt.Errorf("-idleTimeout must not be negative, got %s", o.idleTimeout)
	}
	if o.connManager && (o.connLo < 0 || o.connHi < o.connLo) {
		return nil, fmt.Errorf("invalid connection manager limits -connLo=%d -connHi=%d", o.connLo, o.connHi)
	}
	switch {
	case o.dht:
		c.dhtMode = "auto"
	case o.dhtClient:
		c.dhtMode = "client"
	case o.dhtServer:
		c.dhtMode = "server"
	}
	if o.id != "" {
		if c.identity, err = readIdentity(o.id); err != nil {
			return nil, err
		}
	}
	return c, nil
}
