/* LD_PRELOAD shim for test-serve-zero-copy-reads.sh: splice(2) fails with
 * EINVAL, as it does where a kernel, a file system or a sandbox does not
 * splice those descriptors, when $QNBD_SPLICE_REFUSE is
 *   "socket": for a splice into a socket (the pipe to the connection);
 *   "file":   for a splice out of a regular file (the page cache to the
 *             pipe).
 * Every other splice goes to the C library's. Each refusal appends one
 * byte to $QNBD_SPLICE_LOG, so that the test knows the server met one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef ssize_t (*splice_fn)(int, loff_t*, int, loff_t*, size_t, unsigned int);

static int is_kind(int fd, mode_t kind) {
  struct stat st;
  return fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == kind;
}

static void note_refusal(void) {
  const char* path = getenv("QNBD_SPLICE_LOG");
  if (!path) return;
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return;
  ssize_t w = write(fd, "x", 1);
  (void)w;
  close(fd);
}

ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out, size_t len, unsigned int flags) {
  static splice_fn real;
  if (!real) real = (splice_fn)dlsym(RTLD_NEXT, "splice");
  const char* refuse = getenv("QNBD_SPLICE_REFUSE");
  if (refuse && ((strcmp(refuse, "socket") == 0 && is_kind(fd_out, S_IFSOCK)) ||
                 (strcmp(refuse, "file") == 0 && is_kind(fd_in, S_IFREG)))) {
    note_refusal();
    errno = EINVAL;
    return -1;
  }
  return real(fd_in, off_in, fd_out, off_out, len, flags);
}
