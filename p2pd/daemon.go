package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/routing"
	yamuxtransport "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	noise "github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	ma "github.com/multiformats/go-multiaddr"
)

// Logging goes through go-log, which reads GOLOG_LOG_FMT (json) and GOLOG_LOG_LEVEL from the environment.
var log = logging.Logger("p2pd")

const (
	// defaultRequestTimeout bounds CONNECT and STREAM_OPEN when the request carries no timeout.
	defaultRequestTimeout = 60 * time.Second
	// bootstrapTimeout bounds the initial connection to the -bootstrapPeers.
	bootstrapTimeout = 60 * time.Second
	// bootstrapConnections is how many bootstrap peers the daemon tries to stay connected to.
	bootstrapConnections = 4
	// shutdownTimeout bounds how long closing the libp2p host may take on exit.
	shutdownTimeout = 5 * time.Second
	// userAgent is what the original daemon announces through identify.
	userAgent = "p2pd/0.1"
	// yamuxMaxFrame is the size of the largest yamux frame this daemon sends, header included.
	yamuxMaxFrame = 256 << 10
	// yamuxFramePayload is the most stream bytes one frame carries (its header takes 12 bytes). Writes to a stream
	// come in multiples of it: a write of exactly 256 KiB would go out as a full frame plus a 12-byte one (its own
	// TLS record, system call and record to the receiving client).
	yamuxFramePayload = yamuxMaxFrame - 12
)

type daemon struct {
	cfg      *config
	ctx      context.Context // cancelled on shutdown
	cancel   context.CancelFunc
	host     host.Host
	dht      *dht.IpfsDHT
	listener net.Listener
	maxMsg   int

	mu              sync.Mutex
	streamHandlers  map[protocol.ID]*roundRobin[string]
	unaryHandlers   map[protocol.ID]*roundRobin[*persistentConn]
	shmClients      map[string]bool // callback addresses of clients that take shared-memory pipes (shmpipe.go)
	pipes           shmPipePool
	persistentConns int
	idleTimer       *time.Timer
	closing         bool

	exitOnce sync.Once
	exitCode chan int

	relays       *relayKeeper // -autoRelay=1: relay reservations (relay.go); nil otherwise
	addrSignaler interface{}  // the basic host (its SignalAddressChange), also when d.host is the routed one
}

// streamCtx is the context for streams the daemon opens: they may use limited (relayed) connections, also with
// -relay=0 (which keeps the relay transport, as the original daemon does; its streams reach peers behind relays
// too). Without this, a stream to a peer reachable only through a relay waited for a direct connection that
// could never come, until the caller gave up.
func (d *daemon) streamCtx(ctx context.Context) context.Context {
	return network.WithUseTransient(ctx, "hivemind streams may use relayed connections")
}

func newYamuxTransport() *yamuxtransport.Transport {
	config := *yamuxtransport.DefaultTransport
	// Larger windows let one stream use the bandwidth of a fast link (the default starts at 256 KiB and grows
	// to 16 MiB with auto-tuning); the receive buffers are only committed when the reader falls behind.
	config.MaxStreamWindowSize = 32 * 1024 * 1024
	// Frames of up to 256 KiB instead of 64 KiB: fewer frames, window updates and writes to the client socket
	// per byte, while the receiving daemon can still pass the first part of a large message on before the rest
	// has arrived (1 MiB frames measured slower for 1 MiB messages). Any yamux peer accepts frames up to the
	// window it granted, so this changes nothing for interoperability.
	config.MaxMessageSize = yamuxMaxFrame
	// Every RPC is a new stream, and auto-tuning grows a stream's window from 256 KiB only one doubling per
	// window update: a large transfer waits for window updates during its first megabytes. The first window
	// update (sent with the stream's SYN or ACK) grants 16 MiB at once instead; measured on 64 MiB streams, this
	// raised throughput by about 10%. A peer with default settings just keeps its own window.
	config.InitialStreamWindowSize = 16 << 20
	return &config
}

func (d *daemon) hostOptions() ([]libp2p.Option, error) {
	c := d.cfg
	opts := []libp2p.Option{
		libp2p.UserAgent(userAgent),
		libp2p.DefaultTransports,
		libp2p.Muxer(yamuxtransport.ID, newYamuxTransport()),
		libp2p.DisableMetrics(),
	}
	// The dialer proposes security protocols in this order: TLS first (AES-GCM is hardware-accelerated on common
	// CPUs and faster than Noise's ChaCha20-Poly1305); peers that only speak Noise still negotiate Noise.
	if c.tls {
		opts = append(opts, libp2p.Security(libp2ptls.ID, newBatchingTLS))
	}
	if c.noise {
		opts = append(opts, libp2p.Security(noise.ID, newBatchingNoise))
	}
	// Limits on connections, streams and memory per peer (rcmgr.go); -resourceLimits=0: none, as in the fork.
	rm, err := newResourceManager(c.options)
	if err != nil {
		return nil, err
	}
	opts = append(opts, libp2p.ResourceManager(rm))
	if c.identity != nil {
		opts = append(opts, libp2p.Identity(c.identity))
	}
	if len(c.hostAddrs) > 0 {
		opts = append(opts, libp2p.ListenAddrs(c.hostAddrs...))
	}
	if addrsFactory := d.addrsFactory(); addrsFactory != nil {
		opts = append(opts, libp2p.AddrsFactory(addrsFactory))
	}
	if c.connManager {
		cm, err := connmgr.NewConnManager(c.connLo, c.connHi, connmgr.WithGracePeriod(c.connGrace))
		if err != nil {
			return nil, fmt.Errorf("invalid connection manager settings: %v", err)
		}
		opts = append(opts, libp2p.ConnectionManager(cm))
	}
	if c.natPortMap {
		opts = append(opts, libp2p.NATPortMap())
	}
	if c.autonat {
		opts = append(opts, libp2p.EnableNATService(), libp2p.EnableHolePunching())
	}
	if c.relay {
		opts = append(opts, libp2p.EnableRelay())
	} // else: go-libp2p's default, which also has the relay transport (like the original daemon with -relay=0)
	if c.autoRelay {
		// reservations are kept by d.relays (relay.go); they need the relay transport
		opts = append(opts, libp2p.EnableRelay())
	}
	if c.noListenAddrs {
		// NoListenAddrs would also turn the relay transport off: a peer without listen addresses is reachable
		// through relays only, so keep it (as the original daemon does)
		opts = append(opts, libp2p.NoListenAddrs, libp2p.EnableRelay())
	}
	if c.forceReachabilityPublic {
		opts = append(opts, libp2p.ForceReachabilityPublic())
	} else if c.forceReachabilityPrivate {
		opts = append(opts, libp2p.ForceReachabilityPrivate())
	}
	if c.dhtMode != "" {
		opts = append(opts, libp2p.Routing(d.makeDHT))
	}
	return opts, nil
}

func (d *daemon) makeDHT(h host.Host) (routing.PeerRouting, error) {
	var dhtOpts []dht.Option
	switch d.cfg.dhtMode {
	case "client":
		dhtOpts = append(dhtOpts, dht.Mode(dht.ModeClient))
	case "server":
		dhtOpts = append(dhtOpts, dht.Mode(dht.ModeServer))
	default:
		dhtOpts = append(dhtOpts, dht.Mode(dht.ModeAuto))
	}
	if len(d.cfg.bootstrapPeers) > 0 {
		// lets the DHT reconnect to them if its routing table ever becomes empty
		dhtOpts = append(dhtOpts, dht.BootstrapPeers(d.cfg.bootstrapPeers...))
	}
	// no DHT requests to peers reached only through relays (relay.go)
	dhtOpts = append(dhtOpts, dhtRelayFilters()...)
	d.addrSignaler = h // the basic host, before libp2p wraps it into a routed host
	instance, err := dht.New(d.ctx, h, dhtOpts...)
	if err != nil {
		return nil, err
	}
	d.dht = instance
	return instance, nil
}

func newDaemon(cfg *config) (*daemon, error) {
	ctx, cancel := context.WithCancel(context.Background())
	d := &daemon{
		cfg:            cfg,
		ctx:            ctx,
		cancel:         cancel,
		maxMsg:         cfg.persistentConnMaxMsgSize,
		streamHandlers: map[protocol.ID]*roundRobin[string]{},
		unaryHandlers:  map[protocol.ID]*roundRobin[*persistentConn]{},
		shmClients:     map[string]bool{},
		exitCode:       make(chan int, 1),
	}
	if cfg.autoRelay {
		d.relays = newRelayKeeper(d)
	}
	opts, err := d.hostOptions()
	if err != nil {
		cancel()
		return nil, err
	}
	if err := checkListenPortsFree(cfg.hostAddrs); err != nil { // listenports.go
		cancel()
		return nil, err
	}
	applyDialBackoff(cfg.dialBackoffBase, cfg.dialBackoffMax) // redial.go
	h, err := libp2p.New(opts...)
	if err != nil {
		cancel()
		if strings.Contains(err.Error(), "failed to listen on any addresses") {
			return nil, fmt.Errorf("cannot listen on any address of -hostAddrs %v: %v; pass addresses of this "+
				"machine that are free, with a transport p2pd has (tcp, ws, quic-v1, webtransport), e.g. "+
				"/ip4/0.0.0.0/tcp/0", cfg.hostAddrs, err)
		}
		return nil, fmt.Errorf("cannot start the libp2p host: %v", err)
	}
	d.host = newRedialHost(h, cfg.dialBackoffBase)
	if d.addrSignaler == nil {
		d.addrSignaler = h
	}

	if cfg.relay && cfg.relayService {
		if err := d.startRelayService(); err != nil {
			d.closeHost()
			cancel()
			return nil, err
		}
	}

	listener, err := listenControl(cfg.listenAddr)
	if err != nil {
		d.closeHost()
		cancel()
		return nil, fmt.Errorf("cannot listen on the control address -listen=%s: %v", cfg.listenAddr, err)
	}
	d.listener = listener

	if cfg.bootstrap {
		if err := d.bootstrap(); err != nil {
			d.closeListener()
			d.closeHost()
			cancel()
			return nil, err
		}
	}
	if d.relays != nil {
		go d.relays.run()
	}
	go d.sweepGoneStreamClientsForever() // gonehandlers.go
	return d, nil
}

// startRelayService serves circuit relay v2 (hop) with the limits of the -relay* flags, whatever the
// reachability, like the original daemon.
func (d *daemon) startRelayService() error {
	c := d.cfg
	resources := relay.DefaultResources()
	resources.Limit = &relay.RelayLimit{Duration: c.relayTimeLimit, Data: c.relayDataLimit}
	resources.MaxCircuits = c.relayMaxCircuits
	resources.MaxReservations = relayGrantsPerHeld * c.relayMaxReservations
	resources.MaxReservationsPerPeer = c.relayMaxReservations
	resources.MaxReservationsPerIP = relayGrantsPerHeld * c.relayMaxReservations / relaySourceShare
	resources.MaxReservationsPerASN = relayGrantsPerHeld * c.relayMaxReservations
	resources.BufferSize = c.relayBufferSize
	hints := d.startReservationHints() // relay.go
	if _, err := relay.New(d.host, relay.WithResources(resources), relay.WithACL(hints)); err != nil {
		return fmt.Errorf("cannot start the relay service: %v", err)
	}
	return nil
}

// run prints the readiness lines, serves the control socket and returns the exit status.
func (d *daemon) run() int {
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	// a reader of our stdout/stderr going away must not kill the daemon: writes then just fail
	signal.Ignore(syscall.SIGPIPE)
	d.pipes.sweepStale() // pipe files of killed daemons hold memory until removed (a glob and a check per file)

	if !d.cfg.quiet {
		fmt.Printf("Control socket: %s\nPeer ID: %s\nPeer Addrs:\n", d.cfg.listenAddr, d.host.ID())
		for _, addr := range d.host.Addrs() {
			fmt.Println(addr)
		}
		if d.cfg.bootstrap && len(d.cfg.bootstrapPeers) > 0 {
			fmt.Println("Bootstrap peers:")
			for _, p := range d.cfg.bootstrapPeers {
				for _, a := range p.Addrs {
					fmt.Printf("%s/p2p/%s\n", a, p.ID)
				}
			}
		}
	}

	if d.cfg.idleTimeout > 0 {
		d.mu.Lock()
		if d.persistentConns == 0 {
			d.idleTimer = time.AfterFunc(d.cfg.idleTimeout, func() {
				log.Infow("no persistent connection was opened in time, exiting", "idleTimeout", d.cfg.idleTimeout)
				d.shutdown(0)
			})
		}
		d.mu.Unlock()
	}

	parentGone := watchParent()
	go d.serve()
	for {
		select {
		case <-parentGone:
			log.Infow("the process that started the daemon has ended, exiting")
			d.shutdown(0)
		case sig := <-signals:
			if sig == syscall.SIGINT && d.hasPersistentConns() {
				// Ctrl-C in a terminal reaches the whole process group: the client that owns this daemon is
				// shutting down too and still needs it; the daemon exits when its last persistent connection
				// closes (the original daemon ignores SIGINT altogether).
				log.Infow("SIGINT received while clients are connected: exiting when they disconnect")
				continue
			}
			log.Infow("received a signal, exiting", "signal", sig.String())
			d.shutdown(0)
		case <-d.ctx.Done():
		}
		return <-d.exitCode
	}
}

func (d *daemon) serve() {
	for {
		conn, err := d.listener.Accept()
		if err != nil {
			if d.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			log.Errorw("cannot accept a control connection", "error", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go d.handleConn(conn)
	}
}

func (d *daemon) closeListener() {
	if d.listener == nil {
		return
	}
	_ = d.listener.Close()
	// manet's unix listener unlinks the socket file on Close; make sure it is gone in any case
	if path, err := d.cfg.listenAddr.ValueForProtocol(ma.P_UNIX); err == nil {
		if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
			log.Debugw("cannot remove the control socket", "path", path, "error", err)
		}
	}
}

func (d *daemon) closeHost() {
	done := make(chan struct{})
	go func() {
		if d.dht != nil {
			_ = d.dht.Close()
		}
		_ = d.host.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(shutdownTimeout):
		log.Warnw("closing the libp2p host timed out")
	}
}

// shutdown stops the daemon once: the control socket first (so that clients see it go), then the host.
func (d *daemon) shutdown(code int) {
	d.exitOnce.Do(func() {
		d.mu.Lock()
		d.closing = true
		if d.idleTimer != nil {
			d.idleTimer.Stop()
		}
		d.mu.Unlock()
		d.cancel()
		d.closeListener()
		d.closeHost()
		d.pipes.close()
		d.exitCode <- code
	})
}

func (d *daemon) hasPersistentConns() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.persistentConns > 0
}

// persistentConnOpened cancels the idle timer; persistentConnClosed shuts down after the last one.
func (d *daemon) persistentConnOpened() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.persistentConns++
	if d.idleTimer != nil {
		d.idleTimer.Stop()
		d.idleTimer = nil
	}
}

func (d *daemon) persistentConnClosed() {
	d.mu.Lock()
	d.persistentConns--
	last := d.persistentConns == 0 && !d.closing
	d.mu.Unlock()
	if last {
		log.Infow("the last persistent connection closed, exiting")
		go d.shutdown(0)
	}
}
