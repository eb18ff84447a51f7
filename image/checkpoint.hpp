// Live bitmap edits over one or several devices, atomic with respect to
// guest writes: the control socket's bitmap commands (one device) and
// checkpoints (several).
//
// For each device in turn the edit is prepared (checked, bitmap data
// loaded; writes keep running), then every device's write gate is shut
// and drained, every edit committed in memory and the gates opened again,
// then each edit is written to its image. A write acknowledged before the
// call is in the bitmaps as they were; a write started after the call is
// marked as they are after it; a write in flight during the call is
// wholly on one side, the same side on every device (the gates are all
// closed at the one instant of the switch).
//
// Thread-safety: any thread; edits of overlapping device sets serialize
// (each device's edit lock, taken in address order).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "image/block_device.hpp"

namespace qnbd::image {

struct DeviceEdit {
  BlockDevice* device = nullptr;
  std::vector<LiveBitmapOp> ops;
};

struct EditTiming {
  // Gates shut to gates open: the longest a write waited for the switch.
  std::chrono::nanoseconds pause{0};
};

// Refused before anything changes when any device refuses its ops (the
// error names nothing else changed) or a device is named twice. A
// persist failure after the switch is returned too (memory has switched;
// the image keeps its previous directory). `at_switch`, when given, runs at
// the switch too, with every gate shut and drained (point-in-time views
// are attached there: image/view/cbw.hpp); it must not fail or block.
[[nodiscard]] Result<EditTiming> apply_bitmap_edits(const std::vector<DeviceEdit>& edits,
                                                    const std::function<void()>& at_switch = {});

// The checkpoint: on every device, add the enabled bitmap `name` and, when
// `disable` is not empty, disable that bitmap.
[[nodiscard]] Result<EditTiming> checkpoint(const std::vector<BlockDevice*>& devices, const std::string& name,
                                            const std::string& disable, std::uint64_t granularity = 0,
                                            const std::function<void()>& at_switch = {});

}  // namespace qnbd::image
