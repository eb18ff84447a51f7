// open_image(): format detection and backing chains.
//
// A backing file name is resolved against the directory of the image that
// names it (as QEMU's path_combine). The chain is bounded by
// OpenOptions::max_backing_depth, and an image that is already in the chain
// (same device and inode) is a loop; both are errors, as is a missing file.
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

#include "common/checked.hpp"
#include "common/log.hpp"
#include "image/block_device.hpp"
#include "image/io/range_file.hpp"
#include "image/probe.hpp"
#include "image/qcow2/create.hpp"
#include "image/qcow2/qcow2_image.hpp"
#include "image/raw/raw_device.hpp"

namespace qnbd::image {
namespace {

using Visited = std::vector<std::pair<dev_t, ino_t>>;

std::string combine_path(const std::string& base, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = base.rfind('/');
  if (slash == std::string::npos) return name;
  return base.substr(0, slash + 1) + name;
}

// QEMU's raw node checks (raw_apply_options), with its numbers in the
// messages.
Result<std::unique_ptr<File>> open_range(std::unique_ptr<File> file, const OpenOptions::FileRange& range) {
  const std::uint64_t file_size = QNBD_TRY(file->size());
  if (range.offset > file_size) {
    return make_error(EINVAL, "{}: Offset ({}) cannot be greater than size of the containing file ({})", file->name(),
                      range.offset, file_size);
  }
  if (range.size) {
    if (*range.size % 512) return make_error(EINVAL, "{}: Specified size is not multiple of 512", file->name());
    if (*range.size > file_size - range.offset) {
      return make_error(EINVAL,
                        "{}: The sum of offset ({}) and size ({}) has to be smaller or equal to the actual size of "
                        "the containing file ({})",
                        file->name(), range.offset, *range.size, file_size);
    }
  }
  return std::unique_ptr<File>(std::make_unique<RangeFile>(std::move(file), range.offset, range.size));
}

Result<std::unique_ptr<BlockDevice>> open_one(const std::string& path, const OpenOptions& options, ImageFormat format,
                                              unsigned depth, Visited& visited) {
  if (depth > options.max_backing_depth) {
    return make_error(ELOOP, "{}: backing chain is too deep (more than {} backing files)", path,
                      options.max_backing_depth);
  }
  struct stat st;
  if (::stat(path.c_str(), &st) < 0) return make_error(errno, "{}: {}", path, std::strerror(errno));
  for (const auto& [dev, ino] : visited) {
    if (dev == st.st_dev && ino == st.st_ino) {
      return make_error(ELOOP, "{}: backing chain loop (this file is already in the chain)", path);
    }
  }
  visited.emplace_back(st.st_dev, st.st_ino);

  auto mode = options.read_only ? OpenMode::read_only : OpenMode::read_write;
  std::unique_ptr<File> file = QNBD_TRY(open_posix_file(path, mode, options.cache));
  if (depth == 0 && options.file_range) file = QNBD_TRY(open_range(std::move(file), *options.file_range));

  const bool probed = format == ImageFormat::detect;
  if (probed) {
    // As QEMU (find_image_format): an empty file is raw; otherwise the
    // first sector decides, and a format qnbd does not serve is refused
    // rather than served as its container's bytes.
    std::array<std::byte, kProbeSectorSize> head{};
    if (QNBD_TRY(file->size()) > 0) QNBD_TRY(file->read_zero_fill(head, 0));
    const std::string_view probed_as = probe_format(head, path);
    if (probed_as == "qcow2") {
      format = ImageFormat::qcow2;
    } else if (probed_as == "raw") {
      format = ImageFormat::raw;
    } else {
      return make_error(ENOTSUP,
                        "{}: the image probes as {}, a format qnbd does not serve (qcow2 and raw only); give the "
                        "format (-f raw) to export the file's bytes as they are",
                        path, probed_as);
    }
  }
  // Lock before the engine touches the file (a writable qcow2 open may
  // rewrite the header); backing files are read-only and shared.
  QNBD_TRY(file->set_lock(lock_request(options.lock, depth == 0 ? LockRole::image : LockRole::backing,
                                       format == ImageFormat::qcow2, !options.read_only)));
  if (format == ImageFormat::raw) {
    if (options.load_snapshot && depth == 0) {
      return make_error(ENOTSUP,
                        "Failed to load snapshot: Block format 'raw' used by '{}' does not support temporarily "
                        "loading internal snapshots",
                        path);
    }
    if (probed && !options.read_only) {
      log::warn("{}: format not given and probed as raw: writes that would make the first sector probe as "
                "another format are refused; give the format (-f raw) to lift that",
                path);
    }
    auto dev = RawDevice::open(std::move(file), options, probed);
    if (!dev) return make_error(dev.error().code, "{}: {}", path, dev.error().message);
    return std::unique_ptr<BlockDevice>(std::move(*dev));
  }

  std::string full_backing;
  qcow2::Qcow2Image::Parts parts;
  parts.file = std::move(file);
  parts.path = path;
  parts.open_backing = [&](const std::string& name,
                           const std::string& backing_format) -> Result<std::unique_ptr<BlockDevice>> {
    // "backing": null: QEMU opens no backing node; the image reads as if
    // it had none.
    if (depth == 0 && options.no_backing) return std::unique_ptr<BlockDevice>();
    full_backing = combine_path(path, name);
    if (depth == 0 && options.open_top_backing) return options.open_top_backing();
    ImageFormat f = ImageFormat::detect;
    if (backing_format == "qcow2") {
      f = ImageFormat::qcow2;
    } else if (backing_format == "raw") {
      f = ImageFormat::raw;
    } else if (!backing_format.empty()) {
      return make_error(ENOTSUP, "unsupported backing file format '{}'", backing_format);
    }
    OpenOptions bo = options;
    bo.read_only = true;  // backing files are never written
    bo.data_file.clear();
    bo.load_snapshot.reset();  // the snapshot is the top image's
    bo.file_range.reset();     // so are the range and "backing": null
    bo.no_backing = false;
    bo.open_top_backing = nullptr;
    auto b = open_one(full_backing, bo, f, depth + 1, visited);
    if (!b) return make_error(b.error().code, "could not open backing file: {}", b.error().message);
    return std::move(*b);
  };
  if (options.recover_bitmaps) parts.intent = qcow2::intent_access(path, options.recovery_chunk);
  auto img = qcow2::Qcow2Image::open(std::move(parts), options);
  if (!img) return make_error(img.error().code, "{}: {}", path, img.error().message);
  (*img)->set_full_backing_filename(full_backing);
  return std::unique_ptr<BlockDevice>(std::move(*img));
}

}  // namespace

Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, const OpenOptions& options) {
  if (options.lock.force_share && !options.read_only) {
    return make_error(EINVAL, "{}: force-share can only be used with read-only images", path);
  }
  Visited visited;
  return open_one(path, options, options.format, 0, visited);
}

Result<std::unique_ptr<BlockDevice>> open_image_with_temporary_overlay(const std::string& path,
                                                                       const OpenOptions& options) {
  // The image's format and size, from a read-only open whose locks let
  // other readers in, as the backing file's will.
  OpenOptions base_options = options;
  base_options.read_only = true;
  base_options.recover_bitmaps = false;
  base_options.load_snapshot.reset();
  base_options.open_top_backing = nullptr;
  std::string format;
  std::uint64_t size = 0;
  {
    auto base = QNBD_TRY(open_image(path, base_options));
    format = base->format();
    size = base->size();
  }
  char* real = ::realpath(path.c_str(), nullptr);
  if (real == nullptr) return make_error(errno, "{}: {}", path, std::strerror(errno));
  const std::string backing(real);
  std::free(real);

  // QEMU's get_tmp_filename: $TMPDIR, else /var/tmp.
  const char* tmpdir = std::getenv("TMPDIR");
  std::string overlay = std::string(tmpdir && *tmpdir ? tmpdir : "/var/tmp") + "/qnbd-snapshot.XXXXXX";
  const int fd = ::mkstemp(overlay.data());
  if (fd < 0) {
    return make_error(errno, "could not create the temporary overlay in {}: {}", overlay.substr(0, overlay.rfind('/')),
                      std::strerror(errno));
  }
  ::close(fd);
  // Removed on every path out of here: once the overlay is open its
  // descriptor keeps it alive, so nothing is left behind, even after a
  // SIGKILL (QEMU deletes its overlay only at close).
  struct Unlink {
    std::string p;
    ~Unlink() { ::unlink(p.c_str()); }
  } unlink_overlay{overlay};
  {
    auto file = QNBD_TRY(open_posix_file(overlay, OpenMode::read_write, CacheMode::unsafe));
    qcow2::CreateOptions co;
    co.size = align_up(size, 512);
    co.backing_file = backing;
    co.backing_format = format;
    QNBD_TRY(qcow2::create_qcow2(*file, co));
  }
  OpenOptions top = options;
  top.format = ImageFormat::qcow2;
  top.read_only = false;
  top.recover_bitmaps = false;  // nothing of it outlives the process
  top.load_snapshot.reset();
  top.file_range.reset();
  top.no_backing = false;
  if (options.file_range || options.no_backing) {
    // The overlay's header can name the file but not a range of it or
    // "backing": null: its backing device is the image opened as given.
    top.open_top_backing = [path, base_options]() { return open_image(path, base_options); };
  }
  auto dev = open_image(overlay, top);
  if (!dev) return make_error(dev.error().code, "temporary overlay: {}", dev.error().message);
  log::info("{}: writes go to a temporary overlay (-s), the image is opened read-only", path);
  return dev;
}

}  // namespace qnbd::image
