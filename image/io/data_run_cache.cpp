#include "image/io/data_run_cache.hpp"

#include <algorithm>

namespace qnbd::image {

DataRunCache::Lookup DataRunCache::lookup(std::uint64_t offset) const {
  // A few attempts; if updates keep racing, report "unknown" and let the
  // caller ask the file system, which is always correct.
  for (int attempt = 0; attempt < 4; ++attempt) {
    const std::uint64_t s1 = seq_.load(std::memory_order_acquire);
    if (s1 & 1) continue;
    const std::size_t n = std::min(count_.load(std::memory_order_relaxed), kCapacity);
    // The last run that begins at or before offset. Values read here may be
    // torn by a racing update; indices stay in range, and the sequence check
    // below throws such an answer away.
    std::size_t lo = 0, hi = n;
    while (lo < hi) {
      const std::size_t mid = lo + (hi - lo) / 2;
      if (begin_[mid].load(std::memory_order_relaxed) <= offset)
        lo = mid + 1;
      else
        hi = mid;
    }
    Lookup r;
    if (lo > 0) {
      const std::uint64_t b = begin_[lo - 1].load(std::memory_order_relaxed);
      const std::uint64_t e = end_[lo - 1].load(std::memory_order_relaxed);
      if (b <= offset && offset < e)
        r.run_end = e;
      else if (e <= offset)
        r.prev_end = e;
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    if (seq_.load(std::memory_order_relaxed) == s1) return r;
  }
  return {};
}

void DataRunCache::add(std::uint64_t begin, std::uint64_t end, std::uint64_t epoch_seen) {
  if (begin >= end) return;
  std::lock_guard lk(mu_);
  if (epoch_.load(std::memory_order_relaxed) != epoch_seen) return;
  // Merge with every run it overlaps or touches.
  auto first =
      std::lower_bound(runs_.begin(), runs_.end(), begin, [](const auto& r, std::uint64_t b) { return r.second < b; });
  auto last = first;
  while (last != runs_.end() && last->first <= end) {
    begin = std::min(begin, last->first);
    end = std::max(end, last->second);
    ++last;
  }
  if (first != last && first->first == begin && first->second == end && last - first == 1) return;  // known
  first = runs_.erase(first, last);
  auto pos = runs_.insert(first, {begin, end});
  if (runs_.size() > kCapacity) {
    // Drop the shortest other run: it is the cheapest to learn again (the
    // file system's walk is as long as the run).
    auto victim = runs_.end();
    for (auto it = runs_.begin(); it != runs_.end(); ++it) {
      if (it == pos) continue;
      if (victim == runs_.end() || it->second - it->first < victim->second - victim->first) victim = it;
    }
    runs_.erase(victim);
  }
  publish();
}

void DataRunCache::forget(std::uint64_t begin, std::uint64_t end) {
  if (begin >= end) return;
  std::lock_guard lk(mu_);
  // Probes that started before the change must not add what they saw.
  epoch_.fetch_add(1, std::memory_order_acq_rel);
  bool changed = false;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> kept;
  kept.reserve(runs_.size() + 1);
  for (const auto& r : runs_) {
    if (r.second <= begin || r.first >= end) {
      kept.push_back(r);
      continue;
    }
    changed = true;
    if (r.first < begin) kept.emplace_back(r.first, begin);
    if (r.second > end) kept.emplace_back(end, r.second);
  }
  if (!changed) return;
  // Splitting one run in two can exceed the capacity by one.
  if (kept.size() > kCapacity) kept.pop_back();
  runs_ = std::move(kept);
  publish();
}

std::size_t DataRunCache::size() const {
  std::lock_guard lk(mu_);
  return runs_.size();
}

void DataRunCache::publish() {
  const std::uint64_t s = seq_.load(std::memory_order_relaxed);
  seq_.store(s + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  const std::size_t n = std::min(runs_.size(), kCapacity);
  for (std::size_t i = 0; i < n; ++i) {
    begin_[i].store(runs_[i].first, std::memory_order_relaxed);
    end_[i].store(runs_[i].second, std::memory_order_relaxed);
  }
  count_.store(n, std::memory_order_relaxed);
  seq_.store(s + 2, std::memory_order_release);
}

}  // namespace qnbd::image
