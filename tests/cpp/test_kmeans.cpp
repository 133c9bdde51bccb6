// C++ test of the ops through the dispatcher, against a float64 brute force (no Python involved).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

std::tuple<at::Tensor, at::Tensor> assign(const at::Tensor& x, const at::Tensor& c, bool spherical,
                                          bool check_finite = false) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_assign", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(x, c, spherical, check_finite);
}

// The message of the c10::ValueError the call raises, or "" when it raises none.
template <typename Call>
std::string value_error(Call call) {
  try {
    call();
  } catch (const c10::ValueError& error) {
    return error.what_without_backtrace();
  }
  return "";
}

std::tuple<at::Tensor, at::Tensor> update(const at::Tensor& x, const at::Tensor& labels, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_update", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, labels, k);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t d : {1, 7, 64, 513}) {
    for (int64_t k : {1, 17, 300}) {
      at::Tensor x = at::randn({3, 257, d});
      at::Tensor c = at::randn({3, k, d});
      auto [labels, dist] = assign(x, c, false);
      at::Tensor x64 = x.to(at::kDouble), c64 = c.to(at::kDouble);
      at::Tensor all = (x64.unsqueeze(2) - c64.unsqueeze(1)).pow(2).sum(-1);  // [B, N, K]
      at::Tensor best = std::get<0>(all.min(-1));
      at::Tensor chosen = all.gather(-1, labels.unsqueeze(-1)).squeeze(-1);
      at::Tensor scale = x64.pow(2).sum(-1) + c64.pow(2).sum(-1).amax(-1, true);
      expect((chosen - best).le(1e-5 * scale).all().item<bool>(), "labels optimal up to near-ties");
      expect((dist.to(at::kDouble) - chosen).abs().le(1e-4 * chosen.abs() + 1e-6 * scale + 1e-7).all().item<bool>(),
             "dist equals the float64 distance of the label");
      auto [sums, counts] = update(x, labels, k);
      at::Tensor want = at::zeros({3, k, d}, at::kDouble);
      for (int64_t b = 0; b < 3; ++b) want[b].index_add_(0, labels[b], x64[b]);
      expect(at::allclose(sums.to(at::kDouble), want, 1e-5, 1e-4), "sums equal the float64 sums");
      expect(counts.sum().item<int64_t>() == 3 * 257, "counts add up to N per problem");
    }
  }
  // Exact ties: small integers keep every dot product and norm exact in float whatever the summation
  // order, and 40 centroids repeated 15 times (K = 600) put copies in different 16-centroid panels and
  // 512-centroid blocks. Both engines must return the lowest index among equals, as torch's argmin does.
  {
    at::Tensor x = at::randint(-3, 4, {2, 300, 16}).to(at::kFloat);
    at::Tensor c = at::randint(-3, 4, {2, 40, 16}).to(at::kFloat).repeat({1, 15, 1});
    for (bool spherical : {false, true}) {
      auto [labels, dist] = assign(x, c, spherical);
      at::Tensor x64 = x.to(at::kDouble), c64 = c.to(at::kDouble);
      at::Tensor all = spherical ? -at::matmul(x64, c64.transpose(1, 2))
                                 : (x64.unsqueeze(2) - c64.unsqueeze(1)).pow(2).sum(-1);
      expect(labels.equal(all.argmin(-1)), spherical ? "spherical ties go to the lowest index"
                                                     : "ties go to the lowest index");
    }
  }
  // check_finite: NaN/Inf or norms past the limit (kmeans.h) in either input raise a ValueError that
  // names the input; without the check the call returns, labels in range. Row 250 is past the first
  // chunk of rows of either engine.
  {
    struct Case {
      float x_factor, c_factor;
      const char* message;
    };
    for (const Case& bad : {Case{NAN, 1.0f, "x should be finite, got 1 NaN/Inf"},
                            Case{1.0f, INFINITY, "centroids should be finite, got 1 NaN/Inf"},
                            Case{1e30f, 1.0f, "x overflows float32 when squared"},
                            Case{1.0f, 1e30f, "centroids overflow float32 when squared"}}) {
      at::Tensor x = at::randn({2, 300, 40}), c = at::randn({2, 20, 40});
      x[1][250][7].mul_(bad.x_factor);
      c[1][13][5].mul_(bad.c_factor);
      for (bool spherical : {false, true}) {
        const std::string message = value_error([&] { assign(x, c, spherical, true); });
        expect(message.find(bad.message) != std::string::npos, bad.message);
        auto [labels, dist] = assign(x, c, spherical, false);
        expect(labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < 20,
               "without the check, labels stay in range");
      }
    }
    at::Tensor x = at::randn({2, 300, 40}), c = at::randn({2, 20, 40});
    expect(value_error([&] { assign(x, c, false, true); }).empty(), "finite input passes the check");
  }
  // Inputs that require grad: the ops are not differentiable, so both engines (this test runs on each)
  // return the labels of detached inputs, and outputs that do not require grad.
  {
    at::Tensor x = at::randn({2, 300, 40}), c = at::randn({2, 20, 40});
    auto [labels, dist] = assign(x, c, false);
    auto [labels_g, dist_g] = assign(x.clone().set_requires_grad(true), c.clone().set_requires_grad(true), false, true);
    expect(labels_g.equal(labels) && dist_g.equal(dist), "inputs that require grad: the same labels and distances");
    expect(!dist_g.requires_grad(), "outputs do not require grad");
    auto [sums, counts] = update(x.clone().set_requires_grad(true), labels, 20);
    expect(!sums.requires_grad(), "update: outputs do not require grad");
  }
  bool threw = false;
  try {
    update(at::randn({4, 3}), at::full({4}, 5, at::kLong), 2);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "out-of-range label is rejected");
  if (failures == 0) std::printf("test_kmeans: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
