/* LD_PRELOAD shim for test-serve-power-loss.sh: records every change a
 * process makes to the files below $QNBD_WLOG_DIR, in completion order, so
 * that power_loss.py can rebuild what a disk could hold after a power loss
 * at any moment. Records (all little-endian), appended to $QNBD_WLOG:
 *
 *   u64 time_ns (CLOCK_MONOTONIC), u32 op, u32 file, u64 offset, u64 length,
 *   u32 mode, u32 thread id, then `length` bytes for WRITE and the path
 *   (length bytes) for OPEN and RENAME.
 *
 * op: 1 OPEN (file ids are given per name, first open first; the folder
 * itself is ".", opened to sync it), 2 WRITE, 3 FALLOCATE (mode =
 * fallocate's mode), 4 TRUNCATE (offset = new size), 5 SYNC_START,
 * 6 SYNC_END (fsync/fdatasync of that file; a write made through an
 * O_SYNC/O_DSYNC descriptor is followed by its own pair), 7 RENAME (the
 * file's new name as payload; a file it replaces loses its name), 8 UNLINK.
 *
 * A WRITE is logged after the call returns, a sync's START before it and
 * its END after it (the thread id pairs them): a write is durable once a
 * sync of its file that started after it has ended; a name (a creating
 * OPEN, RENAME, UNLINK) once a sync of the folder did the same.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum {
  OP_OPEN = 1,
  OP_WRITE = 2,
  OP_FALLOCATE = 3,
  OP_TRUNCATE = 4,
  OP_SYNC_START = 5,
  OP_SYNC_END = 6,
  OP_RENAME = 7,
  OP_UNLINK = 8
};
/* Every name a file had gets an id (a live edit of the bitmaps creates a
 * new write-intent record each time), so MAX_FILES bounds the names a run
 * may create; past it the shim aborts the process rather than leave the
 * new file's changes out of the log. */
enum { MAX_FD = 65536, MAX_FILES = 16384 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -2; /* -2: not opened yet, -1: logging off */
static char dir[PATH_MAX];
static size_t dir_len;
static int fd_file[MAX_FD]; /* file id + 1, 0 = not tracked */
static unsigned char fd_sync[MAX_FD];
static char* paths[MAX_FILES];
static int nfiles;

struct record {
  uint64_t time_ns;
  uint32_t op, file;
  uint64_t offset, length;
  uint32_t mode, tid;
};

static void write_all(const void* p, size_t n) {
  const char* c = p;
  while (n) {
    ssize_t w = syscall(SYS_write, log_fd, c, n);
    if (w <= 0) abort();
    c += w;
    n -= (size_t)w;
  }
}

/* Called with `lock` held. */
static int logging(void) {
  if (log_fd == -2) {
    const char *l = getenv("QNBD_WLOG"), *d = getenv("QNBD_WLOG_DIR");
    log_fd = -1;
    if (l && d && realpath(d, dir)) {
      dir_len = strlen(dir);
      log_fd = (int)syscall(SYS_openat, AT_FDCWD, l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (log_fd < 0) abort();
    }
  }
  return log_fd >= 0;
}

static void emit(uint32_t op, int file, uint64_t offset, uint64_t length, uint32_t mode, const void* data,
                 size_t data_len) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  struct record r = {(uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
                     op,
                     (uint32_t)file,
                     offset,
                     length,
                     mode,
                     (uint32_t)syscall(SYS_gettid)};
  write_all(&r, sizeof r);
  if (data_len) write_all(data, data_len);
}

static int tracked(int fd) { return fd >= 0 && fd < MAX_FD ? fd_file[fd] - 1 : -1; }

#define REAL(name)                                                                                                     \
  static __typeof__(name)* real_##name;                                                                                \
  if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

/* The id of the file now named `rel`; with create, a new one (an OPEN
 * record) when none is. Called with `lock` held. */
static int file_id(const char* rel, int create) {
  for (int i = 0; i < nfiles; ++i)
    if (strcmp(paths[i], rel) == 0) return i;
  if (!create) return -1;
  if (nfiles >= MAX_FILES) {
    static const char msg[] = "write_log_shim: too many files to log; stopping\n";
    (void)!syscall(SYS_write, 2, msg, sizeof msg - 1); /* not our write(): lock is held */
    abort();
  }
  int id = nfiles++;
  paths[id] = strdup(rel);
  emit(OP_OPEN, id, 0, strlen(rel), 0, rel, strlen(rel));
  return id;
}

static void note_open(int fd, const char* path, int flags) {
  if (fd < 0 || fd >= MAX_FD) return;
  pthread_mutex_lock(&lock);
  fd_file[fd] = 0;
  char real[PATH_MAX];
  /* An O_TMPFILE file (a view's scratch space) has no name: a power loss
   * takes it with the process, so nothing of it is logged (and its writes
   * are not the folder's). */
  if ((flags & O_TMPFILE) == O_TMPFILE) {
    pthread_mutex_unlock(&lock);
    return;
  }
  if (logging() && realpath(path, real) && strncmp(real, dir, dir_len) == 0 && real[dir_len] == '/') {
    const char* rel = real + dir_len + 1;
    int id = file_id(rel, 1);
    if (id >= 0 && (flags & O_ACCMODE) != O_RDONLY) {
      fd_file[fd] = id + 1;
      fd_sync[fd] = (flags & (O_SYNC | O_DSYNC)) != 0;
    }
  } else if (logging() && realpath(path, real) && strcmp(real, dir) == 0) {
    /* The folder itself: its fsync makes renames and unlinks durable. */
    int id = file_id(".", 1);
    if (id >= 0) fd_file[fd] = id + 1;
  }
  pthread_mutex_unlock(&lock);
}

/* The name below the folder of an absolute or cwd-relative path, or NULL.
 * (The name need not exist: the target of a rename.) */
static const char* below(const char* path, char* buf) {
  if (path[0] == '/') {
    if (snprintf(buf, PATH_MAX, "%s", path) >= PATH_MAX) return NULL;
  } else {
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd) || snprintf(buf, PATH_MAX, "%s/%s", cwd, path) >= PATH_MAX) return NULL;
  }
  char parent[PATH_MAX], real[PATH_MAX];
  memcpy(parent, buf, PATH_MAX);
  char* slash = strrchr(parent, '/');
  if (!slash) return NULL;
  *slash = 0;
  if (!realpath(parent[0] ? parent : "/", real) || strcmp(real, dir) != 0) return NULL;
  return strrchr(buf, '/') + 1;
}

static void note_rename(const char* from, const char* to) {
  char a[PATH_MAX], b[PATH_MAX];
  pthread_mutex_lock(&lock);
  const char *ra, *rb;
  if (logging() && (ra = below(from, a)) && (rb = below(to, b))) {
    int id = file_id(ra, 0);
    if (id >= 0) {
      int gone = file_id(rb, 0);
      if (gone >= 0) paths[gone][0] = 0; /* replaced: no name any more */
      free(paths[id]);
      paths[id] = strdup(rb);
      emit(OP_RENAME, id, 0, strlen(rb), 0, rb, strlen(rb));
    }
  }
  pthread_mutex_unlock(&lock);
}

static void note_unlink(const char* path) {
  char a[PATH_MAX];
  pthread_mutex_lock(&lock);
  const char* ra;
  if (logging() && (ra = below(path, a))) {
    int id = file_id(ra, 0);
    if (id >= 0) {
      paths[id][0] = 0;
      emit(OP_UNLINK, id, 0, 0, 0, NULL, 0);
    }
  }
  pthread_mutex_unlock(&lock);
}

int rename(const char* from, const char* to) {
  REAL(rename);
  int r = real_rename(from, to);
  if (r == 0) note_rename(from, to);
  return r;
}

int renameat(int fromfd, const char* from, int tofd, const char* to) {
  REAL(renameat);
  int r = real_renameat(fromfd, from, tofd, to);
  if (r == 0 && (fromfd == AT_FDCWD || from[0] == '/') && (tofd == AT_FDCWD || to[0] == '/')) note_rename(from, to);
  return r;
}

int unlink(const char* path) {
  REAL(unlink);
  int r = real_unlink(path);
  if (r == 0) note_unlink(path);
  return r;
}

int unlinkat(int dirfd, const char* path, int flags) {
  REAL(unlinkat);
  int r = real_unlinkat(dirfd, path, flags);
  if (r == 0 && (dirfd == AT_FDCWD || path[0] == '/')) note_unlink(path);
  return r;
}

/* open(2)'s mode: passed only with O_CREAT or O_TMPFILE. */
#define MODE_ARG(flags, m)                                                                                             \
  do {                                                                                                                 \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                                                             \
      va_list a;                                                                                                       \
      va_start(a, flags);                                                                                              \
      m = va_arg(a, mode_t);                                                                                           \
      va_end(a);                                                                                                       \
    }                                                                                                                  \
  } while (0)

int open(const char* path, int flags, ...) {
  REAL(open);
  mode_t m = 0;
  MODE_ARG(flags, m);
  int fd = real_open(path, flags, m);
  note_open(fd, path, flags);
  return fd;
}
int open64(const char* path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char* path, int flags, ...) {
  REAL(openat);
  mode_t m = 0;
  MODE_ARG(flags, m);
  int fd = real_openat(dirfd, path, flags, m);
  if (fd >= 0 && (path[0] == '/' || dirfd == AT_FDCWD)) note_open(fd, path, flags);
  return fd;
}
int openat64(int dirfd, const char* path, int flags, ...) __attribute__((alias("openat")));

int close(int fd) {
  REAL(close);
  if (fd >= 0 && fd < MAX_FD) {
    pthread_mutex_lock(&lock);
    fd_file[fd] = 0;
    pthread_mutex_unlock(&lock);
  }
  return real_close(fd);
}

static void sync_pair(int file, int start) { emit(start ? OP_SYNC_START : OP_SYNC_END, file, 0, 0, 0, NULL, 0); }

static void after_write(int fd, const struct iovec* iov, int n, off_t offset, ssize_t done) {
  int file = tracked(fd);
  if (file < 0 || done <= 0) return;
  pthread_mutex_lock(&lock);
  /* One record per call: the payload is the iovecs' first `done` bytes. */
  emit(OP_WRITE, file, (uint64_t)offset, (uint64_t)done, 0, NULL, 0);
  size_t left = (size_t)done;
  for (int i = 0; i < n && left; ++i) {
    size_t k = iov[i].iov_len < left ? iov[i].iov_len : left;
    write_all(iov[i].iov_base, k);
    left -= k;
  }
  /* O_SYNC/O_DSYNC: durable when the call returned. */
  if (fd_sync[fd]) {
    sync_pair(file, 1);
    sync_pair(file, 0);
  }
  pthread_mutex_unlock(&lock);
}

ssize_t pwrite(int fd, const void* buf, size_t n, off_t offset) {
  REAL(pwrite);
  ssize_t r = real_pwrite(fd, buf, n, offset);
  struct iovec v = {(void*)buf, n};
  after_write(fd, &v, 1, offset, r);
  return r;
}
ssize_t pwrite64(int fd, const void* buf, size_t n, off_t offset) __attribute__((alias("pwrite")));

ssize_t pwritev(int fd, const struct iovec* iov, int n, off_t offset) {
  REAL(pwritev);
  ssize_t r = real_pwritev(fd, iov, n, offset);
  after_write(fd, iov, n, offset, r);
  return r;
}
ssize_t pwritev64(int fd, const struct iovec* iov, int n, off_t offset) __attribute__((alias("pwritev")));

ssize_t write(int fd, const void* buf, size_t n) {
  REAL(write);
  if (tracked(fd) < 0) return real_write(fd, buf, n);
  off_t at = lseek(fd, 0, SEEK_CUR);
  ssize_t r = real_write(fd, buf, n);
  struct iovec v = {(void*)buf, n};
  after_write(fd, &v, 1, at, r);
  return r;
}

int fallocate(int fd, int mode, off_t offset, off_t len) {
  REAL(fallocate);
  int r = real_fallocate(fd, mode, offset, len);
  int file = tracked(fd);
  if (r == 0 && file >= 0) {
    pthread_mutex_lock(&lock);
    emit(OP_FALLOCATE, file, (uint64_t)offset, (uint64_t)len, (uint32_t)mode, NULL, 0);
    pthread_mutex_unlock(&lock);
  }
  return r;
}
int fallocate64(int fd, int mode, off_t offset, off_t len) __attribute__((alias("fallocate")));

int ftruncate(int fd, off_t len) {
  REAL(ftruncate);
  int r = real_ftruncate(fd, len);
  int file = tracked(fd);
  if (r == 0 && file >= 0) {
    pthread_mutex_lock(&lock);
    emit(OP_TRUNCATE, file, (uint64_t)len, 0, 0, NULL, 0);
    pthread_mutex_unlock(&lock);
  }
  return r;
}
int ftruncate64(int fd, off_t len) __attribute__((alias("ftruncate")));

static int synced(int fd, int (*real)(int)) {
  int file = tracked(fd);
  if (file >= 0) {
    pthread_mutex_lock(&lock);
    sync_pair(file, 1);
    pthread_mutex_unlock(&lock);
  }
  int r = real(fd);
  if (file >= 0 && r == 0) {
    pthread_mutex_lock(&lock);
    sync_pair(file, 0);
    pthread_mutex_unlock(&lock);
  }
  return r;
}

int fsync(int fd) {
  REAL(fsync);
  return synced(fd, real_fsync);
}
int fdatasync(int fd) {
  REAL(fdatasync);
  return synced(fd, real_fdatasync);
}
