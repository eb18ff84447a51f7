// Consistency check and repair of a qcow2 image (qemu-img check
// equivalent, modelled on QEMU's qcow2_check_refcounts).
//
// The check recounts every host cluster from a full walk of the metadata
// (header, active and snapshot L1/L2 tables, data and compressed clusters,
// refcount table and blocks, snapshot table, bitmap directory/tables/data,
// crypto header), compares with the stored refcounts and verifies COPIED
// flags in the active tables. Repair fixes refcounts in place, or rebuilds
// the whole refcount structure when stored refcounts cannot be trusted, and
// (repair all) fixes COPIED flags.
//
// Thread-safety: the image file must not be in use by anything else.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "common/result.hpp"
#include "image/io/file.hpp"

namespace qnbd::image::qcow2 {

enum class RepairMode { none, leaks, all };

struct CheckResult {
  std::uint64_t corruptions = 0;
  std::uint64_t leaks = 0;
  std::uint64_t check_errors = 0;
  std::uint64_t corruptions_fixed = 0;
  std::uint64_t leaks_fixed = 0;
  std::uint64_t image_end_offset = 0;
  std::uint64_t total_clusters = 0;  // guest clusters
  std::uint64_t allocated_clusters = 0;
  std::uint64_t fragmented_clusters = 0;
  std::uint64_t compressed_clusters = 0;
};

// One line per problem found or repaired, worded like qemu-img's
// ("ERROR cluster 5 refcount=0 reference=1", "Leaked cluster ...",
// "Repairing ..."). qemu-img prints them on stderr.
using CheckMessageSink = std::function<void(const std::string& line)>;

// Check (and with repair != none, repair) the image in `file`. Returns an
// error only if the image cannot be checked at all (unreadable header);
// problems found are counted in the result.
[[nodiscard]] Result<CheckResult> check_qcow2(File& file, RepairMode repair, const CheckMessageSink& message);

}  // namespace qnbd::image::qcow2
