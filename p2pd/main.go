// Command p2pd is a libp2p daemon for hivemind, driven over a local control socket.
//
// It reimplements the command line and control protocol of the daemon hivemind ships
// (learning-at-home/go-libp2p-daemon v0.5.0, "p2pd v0.5.0.hivemind1"), and its peer-to-peer exchanges, so that it
// interoperates with peers running that daemon. It is built on the same libp2p stack: go-libp2p v0.32.1 and
// go-libp2p-kad-dht v0.25.1 (see go.mod).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strings"
	"time"
)

// version is printed by -version; "0.5.0" is the control-protocol release this daemon is compatible with.
const version = "0.5.0-hivemind-compatible"

// options holds the parsed command line; names and defaults follow the original daemon's flags.
type options struct {
	listen                   string
	quiet                    bool
	id                       string
	bootstrap                bool
	bootstrapPeers           string
	dht, dhtClient           bool
	dhtServer                bool
	connManager              bool
	connLo, connHi           int
	connGrace                time.Duration
	natPortMap               bool
	pubsub                   bool
	relay                    bool
	relayHopLimit            int
	autoRelay                bool
	relayDiscovery           bool
	trustedRelays            string
	relayService             bool
	relayMaxCircuits         int
	relayMaxReservations     int
	relayBufferSize          int
	relayDataLimit           int64
	relayTimeLimit           time.Duration
	autonat                  bool
	hostAddrs                string
	announceAddrs            string
	noListenAddrs            bool
	metricsAddr              string
	noise, tls               bool
	forceReachabilityPublic  bool
	forceReachabilityPrivate bool
	idleTimeout              time.Duration
	persistentConnMaxMsgSize int
	unaryReadTimeout         time.Duration
	resourceLimits           bool
	limitConns               int
	limitConnsPerPeer        int
	limitStreamsPerPeer      int
	limitMemory              int64
	limitMemoryPerPeer       int64
	limitMemoryPerConn       int64
	dialBackoffBase          time.Duration
	dialBackoffMax           time.Duration
	muxer                    string
	showVersion              bool
}

func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("p2pd", flag.ContinueOnError)
	fs.StringVar(&o.listen, "listen", "/unix/tmp/p2pd.sock", "daemon control listen multiaddr")
	fs.BoolVar(&o.quiet, "q", false, "be quiet (do not print the control socket, peer id and addresses)")
	fs.StringVar(&o.id, "id", "", "peer identity; private key file (serialized crypto.pb.PrivateKey)")
	fs.BoolVar(&o.bootstrap, "b", false, "connects to bootstrap peers and bootstraps the dht if enabled")
	fs.StringVar(&o.bootstrapPeers, "bootstrapPeers", "",
		"comma separated list of bootstrap peers; defaults to the IPFS DHT peers")
	fs.BoolVar(&o.dht, "dht", false, "Enables the DHT in full node mode")
	fs.BoolVar(&o.dhtClient, "dhtClient", false, "Enables the DHT in client mode")
	fs.BoolVar(&o.dhtServer, "dhtServer", false,
		"Enables the DHT in server mode (use 'dht' unless you actually need this)")
	fs.BoolVar(&o.connManager, "connManager", false, "Enables the Connection Manager")
	fs.IntVar(&o.connLo, "connLo", 256, "Connection Manager Low Water mark")
	fs.IntVar(&o.connHi, "connHi", 512, "Connection Manager High Water mark")
	fs.DurationVar(&o.connGrace, "connGrace", 120*time.Second, "Connection Manager grace period (in seconds)")
	fs.Bool("quic", true, "Enables the QUIC transport (deprecated, always enabled now)")
	fs.BoolVar(&o.natPortMap, "natPortMap", false, "Enables NAT port mapping")
	fs.BoolVar(&o.pubsub, "pubsub", false, "Enables pubsub (not supported by this daemon; must stay 0)")
	fs.String("pubsubRouter", "gossipsub", "Specifies the pubsub router implementation (unused)")
	fs.Bool("pubsubSign", true, "Enables pubsub message signing (unused)")
	fs.Bool("pubsubSignStrict", true, "Enables or disables pubsub strict signature verification (unused)")
	fs.Duration("gossipsubHeartbeatInterval", 0, "Specifies the gossipsub heartbeat interval (unused)")
	fs.Duration("gossipsubHeartbeatInitialDelay", 0, "Specifies the gossipsub initial heartbeat delay (unused)")
	fs.BoolVar(&o.relay, "relay", true, "Enables circuit relay")
	fs.Bool("relayActive", false, "Enables active mode for relay (deprecated, has no effect, use -relayService=1)")
	fs.Bool("relayHop", false, "Enables hop for relay (deprecated, has no effect)")
	fs.IntVar(&o.relayHopLimit, "relayHopLimit", 0, "Sets the hop limit for hop relays (deprecated, has no effect)")
	fs.BoolVar(&o.autoRelay, "autoRelay", false, "Enables autorelay")
	fs.BoolVar(&o.relayDiscovery, "relayDiscovery", true, "Discover potential relays in background if -autoRelay=1")
	fs.StringVar(&o.trustedRelays, "trustedRelays", "",
		"comma separated list of multiaddrs for static circuit relay peers")
	fs.BoolVar(&o.relayService, "relayService", true,
		"Configures this node to serve as a relay for others if -relay=1")
	fs.IntVar(&o.relayMaxCircuits, "relayMaxCircuits", 16,
		"maximum number of open relay connections for each peer if -relayService=1")
	fs.IntVar(&o.relayMaxReservations, "relayMaxReservations", 128,
		"maximum number of relay slots held by all peers together (one address or /64 holds at most a quarter) if -relayService=1")
	fs.IntVar(&o.relayBufferSize, "relayBufferSize", 1<<18,
		"size (in bytes) of the relayed connection buffers if -relayService=1")
	fs.Int64Var(&o.relayDataLimit, "relayDataLimit", 1<<32,
		"maximum data bytes relayed (in each direction) before resetting connection if -relayService=1")
	fs.DurationVar(&o.relayTimeLimit, "relayTimeLimit", 30*time.Minute,
		"maximum duration of a single active relayed connection if -relayService=1")
	fs.BoolVar(&o.autonat, "autonat", false, "Enables the AutoNAT service (and hole punching)")
	fs.StringVar(&o.hostAddrs, "hostAddrs", "", "comma separated list of multiaddrs the host should listen on")
	fs.StringVar(&o.announceAddrs, "announceAddrs", "",
		"comma separated list of multiaddrs the host should announce to the network")
	fs.BoolVar(&o.noListenAddrs, "noListenAddrs", false, "sets the host to listen on no addresses")
	fs.StringVar(&o.metricsAddr, "metricsAddr", "", "an address to bind the metrics handler to (unused)")
	fs.String("f", "", "a file from which to read a json representation of the daemon config (not supported)")
	fs.Bool("i", false, "have the daemon read the json config from stdin (not supported)")
	fs.Bool("pprof", false, "Enables the HTTP pprof handler (not supported, ignored)")
	fs.Uint("pprofPort", 0, "Binds the HTTP pprof handler to a specific port (ignored)")
	fs.BoolVar(&o.noise, "noise", true, "Enables Noise channel security protocol")
	fs.BoolVar(&o.tls, "tls", true, "Enables TLS1.3 channel security protocol")
	fs.BoolVar(&o.forceReachabilityPublic, "forceReachabilityPublic", false,
		"Set up ForceReachability as public for autonat")
	fs.BoolVar(&o.forceReachabilityPrivate, "forceReachabilityPrivate", false,
		"Set up ForceReachability as private for autonat")
	fs.DurationVar(&o.idleTimeout, "idleTimeout", 0,
		"Kills the daemon if no client opens a persistent connection in idleTimeout seconds."+
			" The zero value (default) disables this feature")
	fs.IntVar(&o.persistentConnMaxMsgSize, "persistentConnMaxMsgSize", 4*1024*1024,
		"Max size for persistent connection messages (bytes). Default: 4 MiB")
	addLimitFlags(fs, o)
	addDialBackoffFlags(fs, o)
	fs.StringVar(&o.muxer, "muxer", "yamux", "muxer to use for connections (only yamux)")
	fs.Bool("bandwidthMetrics", true, "Enables collection of bandwidth rate metrics (ignored)")
	fs.BoolVar(&o.showVersion, "version", false, "print the daemon version and exit")
	return fs
}

// fatalf prints one error line to stderr and exits with status 1.
func fatalf(format string, args ...interface{}) {
	msg := fmt.Sprintf(format, args...)
	msg = strings.ReplaceAll(strings.TrimSpace(msg), "\n", "; ")
	fmt.Fprintf(os.Stderr, "p2pd: error: %s\n", msg)
	os.Exit(1)
}

// parseOptions parses the command line; on an error it prints one line and exits (status 2, like Go's flag).
func parseOptions(args []string) *options {
	o := &options{}
	fs := newFlagSet(o)
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fmt.Fprintf(os.Stdout, "Usage of p2pd (%s):\n", version)
			fs.PrintDefaults()
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "p2pd: error: %s (run p2pd -help for the list of flags)\n", err)
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "p2pd: error: unexpected positional arguments %q (flags are written -name=value)\n",
			fs.Args())
		os.Exit(2)
	}
	return o
}

func main() {
	limitSchedulerThreads()
	o := parseOptions(os.Args[1:])
	if o.showVersion {
		fmt.Printf("p2pd %s\n", version)
		return
	}
	cfg, err := buildConfig(o)
	if err != nil {
		fatalf("%v", err)
	}
	d, err := newDaemon(cfg)
	if err != nil {
		fatalf("%v", err)
	}
	stopProfile := startCPUProfile()
	code := d.run()
	stopProfile()
	os.Exit(code)
}

// startCPUProfile writes a CPU profile to $P2PD_CPUPROFILE.<pid> while the daemon runs (a debugging aid).
func startCPUProfile() func() {
	path := os.Getenv("P2PD_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(fmt.Sprintf("%s.%d", path, os.Getpid()))
	if err != nil {
		log.Warnw("cannot create the CPU profile", "error", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		log.Warnw("cannot start the CPU profile", "error", err)
		_ = f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}
}
