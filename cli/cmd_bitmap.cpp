// qnbd bitmap: edit the persistent dirty bitmaps of a qcow2 image at rest,
// with qemu-img bitmap's syntax, order of operations and messages:
//   qnbd bitmap (--add [-g GRANULARITY] [--disable] | --remove | --clear |
//                --enable | --disable | --merge SOURCE [-b SOURCE_FILE [-F FMT]])...
//               [-f FMT] FILE BITMAP
#include <cctype>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/image_cli.hpp"
#include "common/endian.hpp"
#include "image/block_device.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/bitmap_edit.hpp"
#include "image/qcow2/bitmap_intent.hpp"
#include "image/qcow2/format.hpp"

namespace qnbd::cli {
namespace {

using image::qcow2::BitmapOp;

// Is the file a qcow2 image (by its magic)?
Result<bool> is_qcow2(image::File& file) {
  std::byte magic[4]{};
  auto n = QNBD_TRY(file.pread(magic, 0));
  return n == 4 && load_be32(magic) == image::qcow2::QCOW2_MAGIC;
}

// A crashed `qnbd serve`'s write-intent record (docs/crash-safe-bitmaps.md)
// is retired by any edit, since the edit rewrites the directory the record
// was armed for. Retiring it unrecovered would leave the bitmaps it covers
// inconsistent for good (a forced full backup), so recover them first, as
// the next writable `qnbd serve` would: open the image writable through the
// engine (which recovers and stores them) and close it. The caller holds
// the image's lock on its own descriptor; this open takes none. Backing
// files are not opened: recovery reads no guest data.
Result<void> recover_pending_bitmaps(const std::string& path, image::File& file) {
  if (!QNBD_TRY(image::qcow2::intent_bit_set(file))) return ok();
  image::OpenOptions oo;
  oo.format = image::ImageFormat::qcow2;
  oo.read_only = false;
  oo.no_backing = true;
  oo.lock.locking = image::Locking::off;
  auto dev = image::open_image(path, oo);
  if (!dev) {
    return make_error(dev.error().code, "cannot recover the crash-safe bitmaps before the edit: {}",
                      dev.error().message);
  }
  const image::ImageInfo info = (*dev)->info();
  if (auto closed = (*dev)->close(); !closed) {
    return make_error(closed.error().code, "cannot store the recovered bitmaps before the edit: {}",
                      closed.error().message);
  }
  if (info.intent_record == "recovered") {
    std::fprintf(stderr, "qnbd: %s: %s, before the edit\n", path.c_str(), info.intent_record_detail.c_str());
  }
  return ok();
}

struct Args {
  std::vector<BitmapOp> ops;
  std::string granularity, source_file, source_format, format, path, bitmap;
  LockArgs lock;
};

}  // namespace

void add_bitmap_command(CLI::App& app, int& status) {
  auto* cmd = app.add_subcommand("bitmap", "Edit persistent dirty bitmaps of a qcow2 image (like qemu-img bitmap)");
  static Args a;
  auto op = [](BitmapOp::Kind k) { return [k](std::int64_t) { a.ops.push_back(BitmapOp{k, {}}); }; };
  cmd->add_flag_function("--add", op(BitmapOp::Kind::add), "Create BITMAP (enabled unless --disable follows)")
      ->trigger_on_parse();
  cmd->add_flag_function("--remove", op(BitmapOp::Kind::remove), "Delete BITMAP")->trigger_on_parse();
  cmd->add_flag_function("--clear", op(BitmapOp::Kind::clear), "Clear every bit of BITMAP")->trigger_on_parse();
  cmd->add_flag_function("--enable", op(BitmapOp::Kind::enable), "Start recording writes in BITMAP")
      ->trigger_on_parse();
  cmd->add_flag_function("--disable", op(BitmapOp::Kind::disable), "Stop recording writes in BITMAP")
      ->trigger_on_parse();
  cmd->add_option_function<std::string>(
         "--merge",
         [](const std::string& src) {
           a.ops.push_back(BitmapOp{BitmapOp::Kind::merge, src});
         },
         "OR bitmap SOURCE into BITMAP")
      ->trigger_on_parse()
      ->type_name("SOURCE");
  cmd->add_option("-g,--granularity", a.granularity,
                  "Granularity of a new bitmap (default: cluster size in [4k, 64k])");
  cmd->add_option("-b", a.source_file, "Image holding the --merge SOURCE bitmap");
  cmd->add_option("-F", a.source_format, "Format of the -b image (qcow2)");
  cmd->add_option("-f", a.format, "Image format (qcow2); detected if omitted");
  add_lock_options(cmd, a.lock, false);
  cmd->add_option("FILE", a.path, "Image file")->required();
  cmd->add_option("BITMAP", a.bitmap, "Bitmap name")->required();
  cmd->callback([&status] {
    status = 1;
    log::init(0);
    auto has = [](BitmapOp::Kind k) {
      return std::any_of(a.ops.begin(), a.ops.end(), [k](const BitmapOp& o) { return o.kind == k; });
    };
    if (a.ops.empty()) {
      std::fprintf(stderr, "qnbd: Need at least one of --add, --remove, --clear, --enable, --disable, or --merge\n");
      return;
    }
    if (!a.granularity.empty() && !has(BitmapOp::Kind::add)) {
      std::fprintf(stderr, "qnbd: granularity only supported with --add\n");
      return;
    }
    if (!a.source_format.empty() && a.source_file.empty()) {
      std::fprintf(stderr, "qnbd: -F only supported with -b\n");
      return;
    }
    if (!a.source_file.empty() && !has(BitmapOp::Kind::merge)) {
      std::fprintf(stderr, "qnbd: Merge bitmap source file only supported with --merge\n");
      return;
    }
    image::qcow2::BitmapEdit edit;
    edit.bitmap = a.bitmap;
    edit.ops = a.ops;
    if (!a.granularity.empty()) {
      const auto granularity = cvtnum("granularity", a.granularity, 0, INT64_MAX);
      if (!granularity) return;
      edit.granularity = *granularity;
    }
    image::ImageFormat fmt;
    if (!parse_image_format(a.format, fmt)) {
      std::fprintf(stderr, "qnbd: %s: unknown image format '%s' (expected raw or qcow2)\n", a.path.c_str(),
                   a.format.c_str());
      return;
    }
    auto file = image::open_posix_file(a.path, image::OpenMode::read_write, image::CacheMode::writeback);
    if (!file) {
      print_image_error(a.path, file.error());
      return;
    }
    auto qcow2 = is_qcow2(**file);
    if (!qcow2) {
      print_image_error(a.path, qcow2.error());
      return;
    }
    if (!*qcow2 || fmt == image::ImageFormat::raw) {
      std::fprintf(stderr,
                   "qnbd: Operation %s on bitmap %s failed: Can't store persistent bitmaps to '%s': "
                   "Operation not supported\n",
                   image::qcow2::bitmap_op_name(a.ops[0].kind), a.bitmap.c_str(), a.path.c_str());
      return;
    }
    // qemu-img bitmap opens the image for writing (no backing file).
    const image::LockOptions lock = lock_options(a.lock, image::LockUse::tool);
    if (auto locked = (*file)->set_lock(image::lock_request(lock, image::LockRole::image, true, true)); !locked) {
      print_image_error(a.path, locked.error());
      return;
    }
    if (auto recovered = recover_pending_bitmaps(a.path, **file); !recovered) {
      print_image_error(a.path, recovered.error());
      return;
    }
    if (!a.source_file.empty()) {
      if (!a.source_format.empty() && a.source_format != "qcow2") {
        std::fprintf(stderr, "qnbd: %s: only qcow2 images hold persistent bitmaps\n", a.source_file.c_str());
        return;
      }
      edit.external_source = [](const std::string& name) -> Result<image::DirtyBitmap> {
        auto src = image::open_posix_file(a.source_file, image::OpenMode::read_only, image::CacheMode::writeback);
        if (!src) return make_error(src.error().code, "{}: {}", a.source_file, src.error().message);
        if (!QNBD_TRY(is_qcow2(**src))) {
          return make_error(EINVAL, "{}: only qcow2 images hold persistent bitmaps", a.source_file);
        }
        QNBD_TRY((*src)->set_lock(
            image::lock_request(lock_options(a.lock, image::LockUse::tool), image::LockRole::image, true, false)));
        return image::qcow2::load_named_bitmap(**src, name);
      };
    }
    auto r = image::qcow2::edit_bitmaps(**file, edit);
    if (!r) {
      if (r.error().message.rfind("Operation ", 0) == 0) {
        std::fprintf(stderr, "qnbd: %s\n", r.error().message.c_str());
      } else {
        print_image_error(a.path, r.error());
      }
      return;
    }
    status = 0;
  });
}

}  // namespace qnbd::cli
