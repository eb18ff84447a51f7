// probe_format(): which image format QEMU would open a file as, from its
// first 512 bytes, when no format is given.
//
// QEMU probes with every format driver it has (block.c find_image_format
// and bdrv_probe_all, each driver's bdrv_probe) and takes the best score;
// raw scores lowest, so raw is what nothing else claims. qnbd serves only
// qcow2 and raw, but it must probe as QEMU does for two reasons:
//   - opening: a file QEMU would open as vmdk, vdi, ... must not be served
//     as raw bytes (a client would see the container, not the disk), so
//     open_image() refuses it in one line;
//   - writing: a client may not turn a probed raw image into something
//     that probes as another format (raw_co_pwritev in QEMU's
//     raw-format.c): a vmdk descriptor naming a host file, written into
//     sector 0, would otherwise make the next probing open read that
//     file. RawDevice refuses such writes with EPERM, as qemu-nbd does.
// Pure: no I/O.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

namespace qnbd::image {

// QEMU probes this many bytes (BLOCK_PROBE_BUF_SIZE); a shorter file reads
// as zeroes past its end.
inline constexpr std::size_t kProbeSectorSize = 512;

// The QEMU driver name the bytes probe as: "raw" when no other driver
// claims them, else "qcow2", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx",
// "luks", "parallels", "bochs", "cloop" or "dmg". filename is empty when
// there is none (QEMU's write guard probes without one); only dmg looks
// at it.
std::string_view probe_format(std::span<const std::byte, kProbeSectorSize> head, std::string_view filename = {});

}  // namespace qnbd::image
