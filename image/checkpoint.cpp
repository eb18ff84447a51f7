#include "image/checkpoint.hpp"

#include <algorithm>

#include "image/write_gate.hpp"

namespace qnbd::image {

Result<EditTiming> apply_bitmap_edits(const std::vector<DeviceEdit>& edits, const std::function<void()>& at_switch) {
  std::vector<const DeviceEdit*> order;
  for (const DeviceEdit& e : edits) order.push_back(&e);
  // Address order: two edits over overlapping devices take the devices'
  // edit locks in one order and cannot deadlock.
  std::sort(order.begin(), order.end(),
            [](const DeviceEdit* a, const DeviceEdit* b) { return std::less<BlockDevice*>()(a->device, b->device); });
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (order[i]->device == order[i - 1]->device) return make_error(EINVAL, "the same export is named twice");
  }
  std::vector<std::unique_ptr<BitmapTransaction>> txns;
  std::vector<WriteGate*> gates;
  for (const DeviceEdit* e : order) {
    txns.push_back(QNBD_TRY(e->device->begin_bitmap_edit(e->ops)));
    if (WriteGate* g = e->device->write_gate()) gates.push_back(g);
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (WriteGate* g : gates) g->shut();
  for (WriteGate* g : gates) g->drain();
  for (auto& t : txns) t->commit();
  if (at_switch) at_switch();
  for (WriteGate* g : gates) g->open();
  EditTiming timing;
  timing.pause = std::chrono::steady_clock::now() - t0;
  Result<void> first = ok();
  for (auto& t : txns) {
    if (auto r = t->persist(); !r && first) first = std::move(r);
  }
  QNBD_TRY(std::move(first));
  return timing;
}

Result<EditTiming> checkpoint(const std::vector<BlockDevice*>& devices, const std::string& name,
                              const std::string& disable, std::uint64_t granularity,
                              const std::function<void()>& at_switch) {
  if (devices.empty()) return make_error(EINVAL, "a checkpoint needs at least one export");
  std::vector<DeviceEdit> edits;
  for (BlockDevice* d : devices) {
    DeviceEdit e{d, {}};
    LiveBitmapOp add;
    add.kind = LiveBitmapOp::Kind::add;
    add.name = name;
    add.granularity = granularity;
    e.ops.push_back(add);
    if (!disable.empty()) {
      LiveBitmapOp off;
      off.kind = LiveBitmapOp::Kind::disable;
      off.name = disable;
      e.ops.push_back(off);
    }
    edits.push_back(std::move(e));
  }
  return apply_bitmap_edits(edits, at_switch);
}

}  // namespace qnbd::image
