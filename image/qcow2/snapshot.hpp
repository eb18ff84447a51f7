// Internal snapshot table (qcow2.txt "Snapshots"): parsed and validated at
// open. Snapshots are listed by `info`; the active layer is what the engine
// reads.
#pragma once

#include <vector>

#include "common/result.hpp"
#include "image/info.hpp"
#include "image/io/file.hpp"
#include "image/qcow2/header.hpp"

namespace qnbd::image::qcow2 {

// `table_bytes`, if given, receives the table's length in bytes (the end of
// its last entry).
[[nodiscard]] Result<std::vector<SnapshotInfo>> read_snapshot_table(File& file, const Header& header,
                                                                    std::uint64_t file_size,
                                                                    std::uint64_t* table_bytes = nullptr);

}  // namespace qnbd::image::qcow2
