#include "image/probe.hpp"

#include <cstdint>
#include <cstring>

#include "common/endian.hpp"

namespace qnbd::image {
namespace {

// The probes below follow QEMU 7.2's drivers field by field (the driver's
// file and probe function named on each). Each returns QEMU's score: 100
// for a format's own magic, 2 for the weak guesses of cloop and dmg; raw
// scores 1, so any match wins over it.
using Head = std::span<const std::byte, kProbeSectorSize>;

const char* chars(Head h) { return reinterpret_cast<const char*>(h.data()); }

bool starts_with(Head h, std::size_t offset, std::string_view s) {
  return std::memcmp(chars(h) + offset, s.data(), s.size()) == 0;
}

// A C string field: s and then its terminating NUL (QEMU compares such
// fields with strcmp).
bool c_string_at(Head h, std::size_t offset, std::string_view s) {
  return starts_with(h, offset, s) && h[offset + s.size()] == std::byte{0};
}

std::uint32_t le32_at(Head h, std::size_t offset) {
  std::uint32_t v;
  std::memcpy(&v, h.data() + offset, sizeof v);  // the host is little-endian (endian.hpp)
  return v;
}

constexpr std::uint32_t kQcowMagic = 0x514649fb;  // "QFI\xfb" (qcow2.txt "Header")

// block/qcow2.c qcow2_probe: the magic and a version of 2 or more (a
// higher version probes as qcow2 and is refused by the driver later).
int qcow2_score(Head h) { return load_be32(h.data()) == kQcowMagic && load_be32(h.data() + 4) >= 2 ? 100 : 0; }

// block/qcow.c qcow_probe: the same magic with version 1.
int qcow_score(Head h) { return load_be32(h.data()) == kQcowMagic && load_be32(h.data() + 4) == 1 ? 100 : 0; }

// block/qed.c bdrv_qed_probe: "QED\0", little-endian QED_MAGIC.
int qed_score(Head h) { return starts_with(h, 0, std::string_view("QED\0", 4)) ? 100 : 0; }

// block/vpc.c vpc_probe and block/vhdx.c vhdx_probe: an 8-byte cookie.
int vpc_score(Head h) { return starts_with(h, 0, "conectix") ? 100 : 0; }
int vhdx_score(Head h) { return starts_with(h, 0, "vhdxfile") ? 100 : 0; }

// block/vdi.c vdi_probe: VDI_SIGNATURE after the 64-byte text field.
int vdi_score(Head h) { return le32_at(h, 64) == 0xbeda107f ? 100 : 0; }

// crypto/block-luks.c qcrypto_block_luks_has_format: the 6-byte magic and
// big-endian version 1.
int luks_score(Head h) {
  return starts_with(h, 0, std::string_view("LUKS\xba\xbe", 6)) && load_be16(h.data() + 6) == 1 ? 100 : 0;
}

// block/parallels.c parallels_probe: one of two 16-byte magics and
// version 2.
int parallels_score(Head h) {
  return (starts_with(h, 0, "WithoutFreeSpace") || starts_with(h, 0, "WithouFreSpacExt")) && le32_at(h, 16) == 2 ? 100
                                                                                                                 : 0;
}

// block/bochs.c bochs_probe: magic, type and subtype as C strings in
// fields of 32, 16 and 16 bytes, then version 1.0 or 2.0.
int bochs_score(Head h) {
  const std::uint32_t version = le32_at(h, 64);
  return c_string_at(h, 0, "Bochs Virtual HD Image") && c_string_at(h, 32, "Redolog") &&
                 c_string_at(h, 48, "Growing") && (version == 0x00020000 || version == 0x00010000)
             ? 100
             : 0;
}

// block/cloop.c cloop_probe: the version 2.0 shell header.
int cloop_score(Head h) {
  return starts_with(h, 0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
             ? 2
             : 0;
}

// block/dmg.c dmg_probe: the file name alone.
int dmg_score(std::string_view filename) {
  return filename.size() > 4 && filename.substr(filename.size() - 4) == ".dmg" ? 2 : 0;
}

// block/vmdk.c vmdk_probe: a binary extent's magic ("KDMV" or "COWD"), or
// a text descriptor: comment lines ('#' to the end of the line) and blank
// lines of spaces, then "version=1", 2 or 3 ending in "\n" or "\r\n".
int vmdk_score(Head h) {
  const std::uint32_t magic = load_be32(h.data());
  if (magic == 0x4b444d56 || magic == 0x434f5744) return 100;  // "KDMV", "COWD"
  const char* p = chars(h);
  const char* const end = p + h.size();
  while (p < end) {
    if (*p == '#') {
      while (p < end && *p != '\n') ++p;
      if (p == end) break;
      ++p;  // past the '\n'
      continue;
    }
    if (*p == ' ') {
      while (p < end && *p == ' ') ++p;
      if (p < end && *p == '\r') ++p;
      if (p == end || *p != '\n') return 0;
      ++p;
      continue;
    }
    const std::string_view rest(p, static_cast<std::size_t>(end - p));
    for (const char* line :
         {"version=1\n", "version=2\n", "version=3\n", "version=1\r\n", "version=2\r\n", "version=3\r\n"}) {
      if (rest.starts_with(line)) return 100;
    }
    return 0;
  }
  return 0;
}

}  // namespace

std::string_view probe_format(Head head, std::string_view filename) {
  struct Candidate {
    std::string_view name;
    int score;
  };
  // The best score wins and the first of equal scores (bdrv_probe_all);
  // no two of these can reach 100 on the same bytes.
  const Candidate candidates[] = {
      {"qcow2", qcow2_score(head)}, {"qcow", qcow_score(head)},   {"qed", qed_score(head)},
      {"vmdk", vmdk_score(head)},   {"vdi", vdi_score(head)},     {"vpc", vpc_score(head)},
      {"vhdx", vhdx_score(head)},   {"luks", luks_score(head)},   {"parallels", parallels_score(head)},
      {"bochs", bochs_score(head)}, {"cloop", cloop_score(head)}, {"dmg", dmg_score(filename)},
  };
  Candidate best{"raw", 1};
  for (const auto& c : candidates) {
    if (c.score > best.score) best = c;
  }
  return best.name;
}

}  // namespace qnbd::image
