package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// shmPipeFilePrefix starts the name of every pipe file, followed by the daemon's pid, '-' and a random token.
const shmPipeFilePrefix = "hivemind-p2pd-"

// createShmPipeFile creates and maps a new pipe file in dir that only this user can open. Every page of the file is
// reserved first (fallocate): a page of a tmpfs that cannot be backed when it is touched raises SIGBUS, which kills
// this daemon and the client that mapped the file. If the space is not there the error says so and no file is left.
func createShmPipeFile(dir string, ringSize int) (*shmPipeFile, error) {
	size := int64(2 * ringSize)
	claimed, err := claimShmSpace(dir, size)
	if err != nil {
		return nil, err
	}
	defer claimed() // once reserved (or not), the file's pages are in the filesystem's own count
	var token [12]byte
	if _, err := rand.Read(token[:]); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, fmt.Sprintf("%s%d-%s", shmPipeFilePrefix, os.Getpid(), hex.EncodeToString(token[:])))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	p := &shmPipeFile{path: path, ringSize: ringSize, file: f}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		p.release()
		return nil, fmt.Errorf("cannot lock the shared-memory pipe file %s: %w", path, err)
	}
	if err := reserveShmFile(f, size); err != nil {
		p.release()
		return nil, err
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		p.release()
		return nil, err
	}
	p.mem = mem
	return p, nil
}

// removeStaleShmPipeFiles removes the pipe files in dir that daemons killed without cleaning up left behind (with
// their owner killed too, nobody removed them, and every page of a pipe file is reserved memory until it goes). A
// file is stale when the process named in it does not exist and no process holds its lock: a live daemon keeps a
// shared flock on each of its files, which also covers daemons in other pid namespaces that share the tmpfs.
func removeStaleShmPipeFiles(dir string) {
	paths, _ := filepath.Glob(filepath.Join(dir, shmPipeFilePrefix+"*"))
	for _, path := range paths {
		pidText, _, found := strings.Cut(strings.TrimPrefix(filepath.Base(path), shmPipeFilePrefix), "-")
		pid, err := strconv.Atoi(pidText)
		if !found || err != nil || pid <= 0 || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue // not a pipe file, or its daemon (or a process that took its pid) is alive
		}
		f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
		if err != nil {
			continue // another user's, or gone already
		}
		if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
			if err := os.Remove(path); err == nil {
				log.Infow("removed a shared-memory pipe file left behind by a daemon that was killed", "path", path)
			}
		}
		_ = f.Close()
	}
}

// reserveShmFile sets the file's size and allocates all of its pages (mode 0 fallocate), or fails with nothing
// allocated (tmpfs gives the pages of a failed fallocate back).
func reserveShmFile(f *os.File, size int64) error {
	for {
		err := syscall.Fallocate(int(f.Fd()), 0, 0, size)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("cannot reserve %d bytes for a shared-memory pipe in %s (%w): the stream uses its "+
				"socket; give the filesystem more space or point %s to a larger tmpfs", size, f.Name(), err, shmDirEnv)
		}
		return nil
	}
}

// shmClaims counts, per directory, the bytes of the pipe files that this daemon is reserving right now: their pages
// are not in the filesystem's free count yet, and streams that start at once reserve their files concurrently.
var shmClaims struct {
	sync.Mutex
	bytes map[string]int64
}

// claimShmSpace refuses a new pipe file of size bytes that would leave less than 1/shmKeepFreeDivisor of the
// filesystem free, counting the files this daemon is still reserving there; otherwise it counts this one too until
// the returned function is called. The free share is only a courtesy to the other users of the filesystem (another
// daemon on the host checks on its own): reserveShmFile is the guard.
func claimShmSpace(dir string, size int64) (func(), error) {
	shmClaims.Lock()
	defer shmClaims.Unlock()
	total, free, err := shmSpace(dir)
	if err != nil {
		return nil, err
	}
	if pending := shmClaims.bytes[dir]; total > 0 && free-pending-size < total/shmKeepFreeDivisor {
		return nil, fmt.Errorf("%s has %d of %d bytes free (%d being reserved for other pipes): a %d-byte "+
			"shared-memory pipe would leave less than 1/%d of it free, so the stream uses its socket",
			dir, free, total, pending, size, shmKeepFreeDivisor)
	}
	if shmClaims.bytes == nil {
		shmClaims.bytes = map[string]int64{}
	}
	shmClaims.bytes[dir] += size
	return func() {
		shmClaims.Lock()
		defer shmClaims.Unlock()
		if shmClaims.bytes[dir] -= size; shmClaims.bytes[dir] == 0 {
			delete(shmClaims.bytes, dir)
		}
	}, nil
}

// shmKeepsSpare reports whether the filesystem of dir has its share of free space, so that an idle pipe may stay.
func shmKeepsSpare(dir string) bool {
	total, free, err := shmSpace(dir)
	return err == nil && (total == 0 || free >= total/shmKeepFreeDivisor)
}

// shmSpace returns the size of the filesystem of dir and its free bytes; 0, 0 for a tmpfs without a size limit.
func shmSpace(dir string) (total, free int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, fmt.Errorf("cannot check the space for shared-memory pipes in %s: %w", dir, err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

func unmapShm(mem []byte) {
	_ = syscall.Munmap(mem)
}

// shmPeerIsOurUser reports whether the process at the other end of conn runs as this daemon's user (SO_PEERCRED),
// the only one that may map a pipe file.
func shmPeerIsOurUser(conn *net.UnixConn) bool {
	raw, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	var cred *syscall.Ucred
	credErr := raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	return credErr == nil && err == nil && int(cred.Uid) == os.Geteuid()
}
