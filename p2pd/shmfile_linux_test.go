package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"testing"
)

// mountSmallTmpfs mounts a tmpfs of sizeMiB MiB on a fresh directory for the test (root only, else skipped).
func mountSmallTmpfs(t *testing.T, sizeMiB int) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.Itoa(sizeMiB)+"m"); err != nil {
		t.Skipf("cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

func filesIn(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func unixConnPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conns[i].Close() })
	}
	return conns[0], conns[1]
}

// touchEveryPage writes to each page of mem; a page that cannot be backed is reported instead of killing the test.
func touchEveryPage(mem []byte) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = errors.New("fault while touching pipe memory (SIGBUS)")
		}
	}()
	for i := 0; i < len(mem); i += os.Getpagesize() {
		mem[i] = 1
	}
	return nil
}

func TestStreamOnAFullTmpfsGetsNoPipe(t *testing.T) {
	dir := mountSmallTmpfs(t, 2)
	d := &daemon{}
	d.pipes.dir = dir
	if pipe, err := d.pipes.get(); err == nil {
		pipe.release()
		t.Fatalf("a %d-byte pipe was created on a 2 MiB tmpfs", 2*shmRingSize)
	}
	conn, _ := unixConnPair(t)
	if pipe := d.offerShmPipe(conn, true); pipe != nil {
		t.Fatal("a pipe was offered although none can be made: the stream must keep its socket")
	}
	if names := filesIn(t, dir); len(names) != 0 {
		t.Fatalf("files left behind by failed pipes: %v", names)
	}
	d.pipes.close()
}

func TestReservingMoreThanTheTmpfsHoldsFailsAndFreesEverything(t *testing.T) {
	dir := mountSmallTmpfs(t, 2)
	f, err := os.OpenFile(filepath.Join(dir, "pipe"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = reserveShmFile(f, 4<<20)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("reserving 4 MiB on a 2 MiB tmpfs: %v, expected ENOSPC", err)
	}
	total, free, err := shmSpace(dir)
	if err != nil || total != 2<<20 || free != total {
		t.Fatalf("after a failed reservation %d of %d bytes are free (%v): pages were kept", free, total, err)
	}
}

func TestConcurrentPipesOnASmallTmpfsAreFullyBacked(t *testing.T) {
	dir := mountSmallTmpfs(t, 40) // room for two pipes that leave half of it free
	const creators = 12
	pipes := make([]*shmPipeFile, creators)
	errs := make([]error, creators)
	var wg sync.WaitGroup
	for i := 0; i < creators; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var pool shmPipePool // one pool each: nothing serialises the creations but the filesystem
			pool.dir = dir
			pipes[i], errs[i] = pool.get()
		}(i)
	}
	wg.Wait()
	made := 0
	for i, pipe := range pipes {
		if errs[i] != nil {
			continue
		}
		made++
		if err := touchEveryPage(pipe.mem); err != nil {
			t.Errorf("pipe %d: %v", i, err)
		}
		defer pipe.release()
	}
	if made == 0 || made == creators {
		t.Fatalf("%d of %d pipes were made on a 40 MiB tmpfs; expected some but not all", made, creators)
	}
	if names := filesIn(t, dir); len(names) != made {
		t.Fatalf("%d files for %d pipes: failed creations left files behind", len(names), made)
	}
}

func TestConcurrentPipesOfOneDaemonKeepHalfTheTmpfsFree(t *testing.T) {
	dir := mountSmallTmpfs(t, 40) // two 8 MiB pipes leave 24 MiB of 40 free, a third would leave 16
	const creators = 12
	for round := 0; round < 5; round++ {
		pipes := make([]*shmPipeFile, creators)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := 0; i < creators; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				<-start
				pipes[i], _ = createShmPipeFile(dir, shmRingSize)
			}(i)
		}
		close(start)
		wg.Wait()
		made := 0
		for _, pipe := range pipes {
			if pipe != nil {
				made++
				pipe.release()
			}
		}
		// each creation checked the free space before the others' pages were reserved: before the claims were
		// counted, several passed the check at once and took up to the whole tmpfs
		if made == 0 || made > 2 {
			t.Fatalf("round %d: %d pipes were made at once on a 40 MiB tmpfs; the free half allows 1 or 2", round, made)
		}
	}
	if len(shmClaims.bytes) != 0 {
		t.Fatalf("claims left after every creation ended: %v", shmClaims.bytes)
	}
}

func TestIdlePipeIsReleasedWhenTheTmpfsRunsShort(t *testing.T) {
	dir := mountSmallTmpfs(t, 40)
	var pool shmPipePool
	pool.dir = dir
	defer pool.close()
	pipe, err := pool.get()
	if err != nil {
		t.Fatal(err)
	}
	pool.put(pipe) // plenty of space: kept for reuse
	if again, err := pool.get(); err != nil || again != pipe {
		t.Fatalf("an idle pipe must be reused while the tmpfs has space: %v", err)
	}
	other, err := os.OpenFile(filepath.Join(dir, "dataloader-batch"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := reserveShmFile(other, 20<<20); err != nil { // another user takes half of the tmpfs
		t.Fatal(err)
	}
	pool.put(pipe)
	if pipe.mem != nil {
		t.Fatal("an idle pipe must be released when the tmpfs has less than half of its space free")
	}
	if _, err := os.Stat(pipe.path); !os.IsNotExist(err) {
		t.Fatalf("the released pipe's file still exists: %v", err)
	}
}

func TestPipeFilesAreCappedInUseOrIdle(t *testing.T) {
	// each pipe file holds 8 MiB of memory from its creation on, and remote peers choose how many streams they open
	// to a client's handler: without a cap they could make the daemon reserve half of /dev/shm
	dir := mountSmallTmpfs(t, 200)
	pool := shmPipePool{dir: dir, maxPipes: 3}
	defer pool.close()
	var pipes []*shmPipeFile
	for i := 0; i < 3; i++ {
		pipe, err := pool.get()
		if err != nil {
			t.Fatalf("pipe %d of 3: %v", i, err)
		}
		pipes = append(pipes, pipe)
	}
	if pipe, err := pool.get(); err == nil {
		pipe.release()
		t.Fatal("a fourth pipe was made beyond the cap of 3")
	}
	pool.put(pipes[0]) // idle files count too, and are handed out again
	if again, err := pool.get(); err != nil || again != pipes[0] {
		t.Fatalf("the idle pipe must be reused at the cap: %v", err)
	}
	pool.release(pipes[1])
	if pipe, err := pool.get(); err != nil {
		t.Fatalf("a released pipe must make room for a new one: %v", err)
	} else {
		pool.release(pipe)
	}
	if names := filesIn(t, dir); len(names) != 2 {
		t.Fatalf("%d files, expected the 2 pipes still in use", len(names))
	}
}

func TestDefaultPipeCapBoundsTheReservedMemory(t *testing.T) {
	if reserved := shmMaxPipes * 2 * shmRingSize; reserved > 256<<20 {
		t.Fatalf("up to %d MiB of pipe files: remote peers would decide how much memory the daemon reserves", reserved>>20)
	}
}

func TestFilesOfKilledDaemonsAreRemovedBeforeTheFirstPipe(t *testing.T) {
	// a daemon killed together with its client leaves its pipe files, each one 8 MiB of reserved memory, for good
	dir := mountSmallTmpfs(t, 40)
	exited := exec.Command("true")
	if err := exited.Run(); err != nil {
		t.Fatal(err)
	}
	deadPid := exited.Process.Pid
	write := func(name string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	stale := write(fmt.Sprintf("%s%d-%s", shmPipeFilePrefix, deadPid, "0123"))
	ours := write(fmt.Sprintf("%s%d-%s", shmPipeFilePrefix, os.Getpid(), "4567"))
	other := write("not-a-pipe-file")
	// a live daemon in another pid namespace: its pid is unknown here, but it holds the lock of its file
	locked := write(fmt.Sprintf("%s%d-%s", shmPipeFilePrefix, deadPid, "89ab"))
	lockedFile, err := os.Open(locked)
	if err != nil {
		t.Fatal(err)
	}
	defer lockedFile.Close()
	if err := syscall.Flock(int(lockedFile.Fd()), syscall.LOCK_SH); err != nil {
		t.Fatal(err)
	}

	pool := shmPipePool{dir: dir}
	defer pool.close()
	pipe, err := pool.get()
	if err != nil {
		t.Fatal(err)
	}
	defer pool.release(pipe)
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("the file of a dead daemon is still there: %v", err)
	}
	for _, path := range []string{ours, other, locked, pipe.path} {
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("%s must stay: %v", path, err)
		}
	}
}

// TestHelperConnectAsAnotherUser is not a test: run by TestNoPipeIsOfferedToAnotherUsersClient in a child process
// of another user, it connects to the unix socket named by P2PD_TEST_CONNECT and waits until it is closed.
func TestHelperConnectAsAnotherUser(t *testing.T) {
	path := os.Getenv("P2PD_TEST_CONNECT")
	if path == "" {
		t.Skip("helper process only")
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Read(make([]byte, 1))
}

// A client of another user that can reach the daemon's socket gets no pipe: it could not map the file (only the
// daemon's user can open it; hivemind's client declines such offers), but it could answer 'S' and announce ring
// bytes it never wrote, and the daemon would forward what an earlier stream left in the reused up ring (another
// client's data) to a peer of its choosing.
func TestNoPipeIsOfferedToAnotherUsersClient(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	dir, err := os.MkdirTemp("", "p2pd-other-user-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "control.sock")
	listener, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	if err := os.Chmod(path, 0o777); err != nil { // a control socket that every local user may connect to
		t.Fatal(err)
	}
	d := &daemon{pipes: shmPipePool{dir: mountSmallTmpfs(t, 64)}}
	defer d.pipes.close()
	// the test binary, where the other user may run it
	binary := filepath.Join(dir, "p2pd.test")
	if data, err := os.ReadFile(os.Args[0]); err != nil {
		t.Fatal(err)
	} else if err := os.WriteFile(binary, data, 0o755); err != nil {
		t.Fatal(err)
	}

	offer := func(asNobody bool) *shmPipeFile {
		t.Helper()
		child := exec.Command(binary, "-test.run=^TestHelperConnectAsAnotherUser$")
		child.Env = append(os.Environ(), "P2PD_TEST_CONNECT="+path)
		if asNobody {
			child.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		}
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = child.Wait() }()
		conn, err := listener.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return d.offerShmPipe(conn, true)
	}
	if pipe := offer(false); pipe == nil {
		t.Fatal("a client of the daemon's own user was offered no pipe")
	} else {
		d.pipes.put(pipe)
	}
	if pipe := offer(true); pipe != nil {
		d.pipes.put(pipe)
		t.Fatal("a client of another user was offered a pipe")
	}
}
