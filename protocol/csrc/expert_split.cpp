// The routers' split of one layer's (token, expert) pairs over the holders of each replicated
// expert, compiled: it runs once per layer per step on the routers' critical path. The algorithm
// is protocol/expert_cost.py's, step for step (branch and bound over which holders compute each
// replicated expert, Hall's condition over the connected sets of experts, augmenting paths for
// the rows), with the same tie-breaks, so both give the same split; the Python there is the
// reference and its docstrings the explanation (tests/test_expert_cost.py checks they agree).
//
// Sizes: E = experts, G = groups (<= 63: a group set is a 64-bit mask), Q = replicated experts
// with pairs this step (<= 20: the bounds range over the 2^Q sets of them). Units: 1/row of a
// row's cost, as in the Python (`ROW_UNITS`).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace {

using Units = int64_t;
using Mask = uint64_t;
using Groups = std::vector<int>;

constexpr int kMaxGroups = 63;
constexpr int kMaxReplicated = 20;

Units ceil_div(Units a, Units b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
Units floor_div(Units a, Units b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
Mask mask_of(const Groups& groups) {
  Mask m = 0;
  for (int g : groups) m |= Mask{1} << g;
  return m;
}

// The least T with sum over levels of max(0, T - level) >= units; `v` sorted ascending.
Units water_level(const Units* v, size_t n, Units units) {
  Units prefix = 0;
  for (size_t j = 1; j <= n; ++j) {
    prefix += v[j - 1];
    if (j == n || units + prefix <= v[j] * static_cast<Units>(j)) return ceil_div(units + prefix, j);
  }
  return n ? v[0] : 0;
}

// The least T with sum over levels of floor((T - level) / row), where positive, >= rows.
Units rows_fit_at(std::vector<Units>& v, Units rows, Units row) {
  std::sort(v.begin(), v.end());
  const Units t = water_level(v.data(), v.size(), row * rows);
  Units deficit = rows;
  for (Units x : v) deficit -= std::max<Units>(0, floor_div(t - x, row));
  if (deficit <= 0) return t;
  std::vector<Units> next;
  next.reserve(v.size());
  for (Units x : v) next.push_back(x + row * (std::max<Units>(0, floor_div(t - x, row)) + 1));
  std::sort(next.begin(), next.end());
  return next.at(deficit - 1);
}

// Every non-empty set of experts (bit masks over `masks`) connected through shared groups, increasing.
std::vector<uint32_t> connected_sets(const std::vector<Mask>& masks) {
  const int q = static_cast<int>(masks.size());
  std::vector<uint32_t> adjacent(q, 0);
  for (int i = 0; i < q; ++i)
    for (int j = 0; j < q; ++j)
      if (i != j && (masks[i] & masks[j])) adjacent[i] |= 1u << j;
  std::vector<uint32_t> out;
  for (uint32_t subset = 1; subset < (1u << q); ++subset) {
    uint32_t seen = subset & (~subset + 1), frontier = seen;
    while (frontier) {
      const int i = __builtin_ctz(frontier);
      frontier &= frontier - 1;
      const uint32_t fresh = adjacent[i] & subset & ~seen;
      seen |= fresh;
      frontier |= fresh;
    }
    if (seen == subset) out.push_back(subset);
  }
  return out;
}

void combinations(const Groups& c, size_t k, size_t from, Groups& now, std::vector<Groups>& out) {
  if (now.size() == k) {
    out.push_back(now);
    return;
  }
  for (size_t i = from; i < c.size(); ++i) {
    now.push_back(c[i]);
    combinations(c, k, i + 1, now, out);
    now.pop_back();
  }
}

class Search {
 public:
  Search(std::vector<Units> need, std::vector<Groups> choices, std::vector<Units> base, std::vector<char> used,
         Units weight, Units message, Units row, int groups, int lanes, int budget)
      : need_(std::move(need)), choices_(std::move(choices)), base_(std::move(base)), used_(std::move(used)),
        weight_(weight), message_(message), row_(row), groups_(groups), lanes_(0 < lanes && lanes < groups ? lanes : 0),
        q_(static_cast<int>(need_.size())), budget_(budget) {
    for (const Groups& c : choices_) {
      std::vector<Groups> subsets;
      Groups now;
      for (size_t k = 1; k <= c.size(); ++k) combinations(c, k, 0, now, subsets);
      subsets_.push_back(std::move(subsets));
      masks_.push_back(mask_of(c));
    }
    sets_ = connected_sets(masks_);
    connected_.assign(size_t{1} << q_, 0);
    for (uint32_t s : sets_) connected_[s] = 1;
    union_.assign(size_t{1} << q_, 0);
    total_.assign(size_t{1} << q_, 0);
    best_allowed_ = greedy();
    best_cost_ = value(best_allowed_);
  }

  // The allowed holders of each expert, and the least layer time (units) they reach.
  std::pair<std::vector<Groups>, Units> best() {
    std::vector<Groups> chosen;
    if (best_cost_ > bound(chosen)) descend(chosen);
    return {best_allowed_, best_cost_};
  }

  // Per group, its units before rows of replicated experts (Python: `_charges`); `gets`: it gets any.
  void charges(const std::vector<Groups>& allowed, std::vector<Units>& fixed, std::vector<char>& gets) const {
    fixed = base_;
    gets = used_;
    for (const Groups& a : allowed)
      for (int g : a) {
        fixed[g] += weight_;
        gets[g] = 1;
      }
    for (int g = 0; g < groups_; ++g)
      if (gets[g]) fixed[g] += message_;
  }

 private:
  std::vector<Groups> greedy() const {
    std::vector<Units> load(groups_);
    std::vector<char> gets = used_;
    for (int g = 0; g < groups_; ++g) load[g] = base_[g] + (used_[g] ? message_ : 0);
    std::vector<Groups> allowed;
    for (int e = 0; e < q_; ++e) {
      auto level = [&](int g) { return load[g] + weight_ + (gets[g] ? 0 : message_); };
      Groups by_load = choices_[e];
      std::sort(by_load.begin(), by_load.end(), [&](int a, int b) {
        const Units la = load[a] + (gets[a] ? 0 : message_), lb = load[b] + (gets[b] ? 0 : message_);
        return la != lb ? la < lb : a < b;
      });
      Units best_t = 0;
      size_t best_k = 0;
      for (size_t k = 1; k <= by_load.size(); ++k) {
        std::vector<Units> levels;
        for (size_t i = 0; i < k; ++i) levels.push_back(level(by_load[i]));
        const Units t = rows_fit_at(levels, need_[e], row_);
        if (best_k == 0 || t < best_t) best_t = t, best_k = k;
      }
      Groups chosen(by_load.begin(), by_load.begin() + best_k);
      for (int g : chosen) {
        const Units l = level(g);
        load[g] = std::max(l, std::min(best_t, l + row_ * need_[e]));
        gets[g] = 1;
      }
      allowed.push_back(std::move(chosen));
    }
    return allowed;
  }

  // `charges`, and the most units a paying group carries before rows: a floor on the layer's time.
  Units charged(const std::vector<Groups>& allowed, std::vector<Units>& fixed, std::vector<char>& paying) const {
    charges(allowed, fixed, paying);
    Units most = 0;
    for (int g = 0; g < groups_; ++g)
      if (paying[g]) most = std::max(most, fixed[g]);
    return most;
  }

  Units value(const std::vector<Groups>& allowed) {
    std::vector<Units> fixed;
    std::vector<char> paying;
    Units slowest = charged(allowed, fixed, paying);
    std::vector<Mask> masks;
    for (const Groups& a : allowed) masks.push_back(mask_of(a));
    std::vector<Units> levels;
    for (uint32_t subset : sets_) {
      Mask groups_mask = 0;
      Units rows = 0;
      for (int i = 0; i < q_; ++i)
        if (subset >> i & 1) groups_mask |= masks[i], rows += need_[i];
      levels.clear();
      for (int g = 0; g < groups_; ++g)
        if (groups_mask >> g & 1) levels.push_back(fixed[g]);
      slowest = std::max(slowest, rows_fit_at(levels, rows, row_));
    }
    if (lanes_) slowest = std::max(slowest, ceil_div(compute(fixed, paying) + row_ * sum_need(), lanes_));
    return slowest;
  }

  Units bound(const std::vector<Groups>& chosen) {
    const int k = static_cast<int>(chosen.size());
    std::vector<Units> fixed;
    std::vector<char> paying;
    Units bound = charged(chosen, fixed, paying);
    std::vector<int> order(groups_);  // groups by fixed units, so each set's levels come out sorted
    for (int g = 0; g < groups_; ++g) order[g] = g;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return fixed[a] < fixed[b]; });
    Mask masks[kMaxReplicated];
    Units units[kMaxReplicated];
    for (int i = 0; i < q_; ++i) {
      masks[i] = i < k ? mask_of(chosen[i]) : masks_[i];
      units[i] = row_ * need_[i] + (i >= k ? weight_ : 0);
    }
    Units levels[kMaxGroups];
    for (uint32_t subset = 1; subset < (1u << q_); ++subset) {
      const int low = __builtin_ctz(subset);
      const uint32_t rest = subset & (subset - 1);
      union_[subset] = union_[rest] | masks[low];
      total_[subset] = total_[rest] + units[low];
      if (!connected_[subset]) continue;  // level rises with the units: the max over all sets is the bound
      size_t n = 0;
      for (int g : order)
        if (union_[subset] >> g & 1) levels[n++] = fixed[g];
      bound = std::max(bound, water_level(levels, n, total_[subset]));
    }
    if (lanes_) bound = std::max(bound, ceil_div(compute(fixed, paying) + total_[(size_t{1} << q_) - 1], lanes_));
    return bound;
  }

  void descend(std::vector<Groups>& chosen) {
    ++nodes_;
    const size_t k = chosen.size();
    if (k == static_cast<size_t>(q_)) {
      const Units cost = value(chosen);
      if (cost < best_cost_) best_cost_ = cost, best_allowed_ = chosen;
      return;
    }
    const std::vector<Groups>& subsets = subsets_[k];
    std::vector<std::pair<Units, size_t>> bounded;
    for (size_t i = 0; i < subsets.size(); ++i) {
      chosen.push_back(subsets[i]);
      bounded.emplace_back(bound(chosen), i);
      chosen.pop_back();
    }
    std::sort(bounded.begin(), bounded.end());
    for (const auto& [b, i] : bounded) {
      if (b >= best_cost_) break;
      if (nodes_ >= budget_) return;
      chosen.push_back(subsets[i]);
      descend(chosen);
      chosen.pop_back();
    }
  }

  Units compute(const std::vector<Units>& fixed, const std::vector<char>& paying) const {
    Units c = 0;
    for (int g = 0; g < groups_; ++g) c += fixed[g] - (paying[g] ? message_ : 0);
    return c;
  }
  Units sum_need() const {
    Units s = 0;
    for (Units n : need_) s += n;
    return s;
  }

  std::vector<Units> need_;
  std::vector<Groups> choices_;
  std::vector<Units> base_;
  std::vector<char> used_;
  Units weight_, message_, row_;
  int groups_, lanes_, q_;
  int nodes_ = 0, budget_;
  std::vector<std::vector<Groups>> subsets_;
  std::vector<Mask> masks_;
  std::vector<uint32_t> sets_;
  std::vector<char> connected_;
  std::vector<Mask> union_;
  std::vector<Units> total_;
  std::vector<Groups> best_allowed_;
  Units best_cost_ = 0;
};

struct Move {
  int expert, from, to;  // from: -1 for the expert's new row
};

// Moves that make room for one more row of expert `start` (Python: `_augmenting_path`).
bool augmenting_path(int start, const std::vector<Groups>& allowed, const std::vector<std::vector<Units>>& rows,
                     const std::vector<Units>& left, std::vector<Move>& path) {
  const int groups = static_cast<int>(left.size()), q = static_cast<int>(allowed.size());
  std::vector<std::pair<int, int>> came(groups, {-2, -2}), frontier{{start, -1}}, next;
  while (!frontier.empty()) {
    next.clear();
    for (const auto& [expert, src] : frontier)
      for (int g : allowed[expert]) {
        if (came[g].first != -2 || g == src) continue;
        came[g] = {expert, src};
        if (left[g] > 0) {
          path.clear();
          for (;;) {
            const auto [e, s] = came[g];
            path.push_back({e, s, g});
            if (s == -1) break;
            g = s;
          }
          std::reverse(path.begin(), path.end());
          return true;
        }
        for (int other = 0; other < q; ++other)
          if (rows[other][g] > 0) next.emplace_back(other, g);
      }
    std::swap(frontier, next);
  }
  return false;
}

// Integer rows of each expert on its allowed groups within `capacity` (Python: `_flow`): [Q][G].
std::vector<std::vector<Units>> flow(const std::vector<Units>& need, const std::vector<Groups>& allowed,
                                     std::vector<Units> left) {
  const int q = static_cast<int>(need.size());
  std::vector<std::vector<Units>> rows(q, std::vector<Units>(left.size(), 0));
  std::vector<Units> missing;
  for (int e = 0; e < q; ++e) {
    Units n = need[e];
    Groups by_room = allowed[e];
    std::stable_sort(by_room.begin(), by_room.end(), [&](int a, int b) { return left[a] > left[b]; });
    for (int g : by_room) {
      const Units take = std::min(n, left[g]);
      rows[e][g] += take;
      left[g] -= take;
      n -= take;
    }
    missing.push_back(n);
  }
  std::vector<Move> path;
  for (int e = 0; e < q; ++e)
    for (Units n = missing[e]; n > 0;) {
      if (!augmenting_path(e, allowed, rows, left, path))
        throw std::logic_error("the least slowest group admits every row");
      Units amount = std::min(n, left[path.back().to]);
      for (const Move& m : path)
        if (m.from >= 0) amount = std::min(amount, rows[m.expert][m.from]);
      for (const Move& m : path) {
        if (m.from >= 0) rows[m.expert][m.from] -= amount;
        rows[m.expert][m.to] += amount;
      }
      left[path.back().to] -= amount;
      n -= amount;
    }
  return rows;
}

// The replicated experts' shares (Python: the second half of `split_pairs_python`).
void split_replicated(const std::vector<int64_t>& counts, const std::vector<std::vector<int>>& holders,
                      const std::vector<int>& replicated, const std::vector<Units>& base, const std::vector<char>& used,
                      int num_groups, int64_t weight, int64_t message, int lanes, int64_t row, int budget,
                      std::vector<std::vector<int64_t>>& shares) {
  std::vector<Units> need;
  std::vector<Groups> choices;
  for (int e : replicated) need.push_back(counts[e]), choices.push_back(holders[e]);
  Search search(need, choices, base, used, weight, message, row, num_groups, lanes, budget);
  const auto [allowed, slowest] = search.best();
  std::vector<Units> fixed;
  std::vector<char> gets;
  search.charges(allowed, fixed, gets);
  std::vector<Units> capacity(num_groups);
  for (int g = 0; g < num_groups; ++g) capacity[g] = std::max<Units>(0, floor_div(slowest - fixed[g], row));
  const auto rows = flow(need, allowed, capacity);
  for (size_t i = 0; i < replicated.size(); ++i) {
    const int e = replicated[i];
    for (size_t j = 0; j < holders[e].size(); ++j) shares[e][j] = rows[i][holders[e][j]];
  }
}

}  // namespace

// counts [E], holders [E][*] -> (shares [E][len(holders[e])]: the pairs each holder of each expert
// takes, per group [G]: the pairs each group gets).
std::pair<std::vector<std::vector<int64_t>>, std::vector<int64_t>> split_pairs(
    const std::vector<int64_t>& counts, const std::vector<std::vector<int>>& holders, int num_groups, int64_t weight,
    int64_t message, int lanes, int64_t row, int budget) {
  if (counts.size() != holders.size()) throw std::invalid_argument("counts and holders differ in length");
  if (num_groups < 1 || num_groups > kMaxGroups) throw std::invalid_argument("1 to 63 groups");
  std::vector<Units> base(num_groups, 0);
  std::vector<char> used(num_groups, 0);
  std::vector<int> replicated;
  for (size_t e = 0; e < holders.size(); ++e) {
    if (holders[e].empty()) throw std::invalid_argument("every expert needs a holder");
    for (int g : holders[e])
      if (g < 0 || g >= num_groups) throw std::invalid_argument("a holder outside the groups");
    if (counts[e] <= 0) continue;
    if (holders[e].size() == 1) {
      base[holders[e][0]] += weight + row * counts[e];
      used[holders[e][0]] = 1;
    } else {
      replicated.push_back(static_cast<int>(e));
    }
  }
  if (replicated.size() > static_cast<size_t>(kMaxReplicated))
    throw std::invalid_argument("over 20 replicated experts with pairs");
  std::stable_sort(replicated.begin(), replicated.end(), [&](int a, int b) { return counts[a] > counts[b]; });
  std::vector<std::vector<int64_t>> shares(holders.size());
  for (size_t e = 0; e < holders.size(); ++e)
    shares[e].assign(holders[e].size(), holders[e].size() == 1 ? counts[e] : 0);
  if (!replicated.empty())
    split_replicated(counts, holders, replicated, base, used, num_groups, weight, message, lanes, row, budget, shares);
  std::vector<int64_t> per_group(num_groups, 0);
  for (size_t e = 0; e < holders.size(); ++e)
    for (size_t j = 0; j < holders[e].size(); ++j) per_group[holders[e][j]] += shares[e][j];
  return {shares, per_group};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("split_pairs", &split_pairs, "a layer's pairs over each expert's holders, least slowest group first");
}
