// File formats shared by the CPU and GPU runs of the certified epilogue (see test_certified_epilogue.cpp).
#pragma once

#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <vector>

#include "cuda/certified_epilogue.h"

template <typename T>
inline void read(std::ifstream& in, T* data, size_t count = 1) {
  in.read(reinterpret_cast<char*>(data), static_cast<std::streamsize>(sizeof(T) * count));
  if (!in) throw std::runtime_error("short input");
}

template <typename T>
inline void write(std::ofstream& out, const T& value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}

struct TileInput {
  int32_t rows, k, d, tile_n;
  double unit, beta, max_norm;
  std::vector<float> scores;  // rows x k, row-major
  std::vector<double> alpha, row_sq;

  xdc_fast::certified::ProblemTerms problem() const {
    return xdc_fast::certified::ProblemTerms{beta, max_norm, d, unit};
  }
};

inline TileInput read_tile_input(std::ifstream& in) {
  TileInput t;
  read(in, &t.rows);
  read(in, &t.k);
  read(in, &t.d);
  read(in, &t.tile_n);
  read(in, &t.unit);
  read(in, &t.beta);
  read(in, &t.max_norm);
  t.scores.resize(static_cast<size_t>(t.rows) * t.k);
  t.alpha.resize(t.rows);
  t.row_sq.resize(t.rows);
  read(in, t.scores.data(), t.scores.size());
  read(in, t.alpha.data(), t.alpha.size());
  read(in, t.row_sq.data(), t.row_sq.size());
  return t;
}

inline void write_record(std::ofstream& out, int32_t row, const xdc_fast::certified::Top2& t, bool certified,
                         double bound) {
  write(out, row);
  write(out, static_cast<int32_t>(t.index));
  write(out, t.best);
  write(out, t.second);
  write(out, static_cast<uint8_t>(certified));
  write(out, bound);
}
