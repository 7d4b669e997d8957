#include <numeric>

#include <boost/lexical_cast.hpp>

#include "app.h"

double mean_length(const std::vector<std::string> &words) {
    if (words.empty()) {
        return 0.0;
    }
    const auto total = std::accumulate(words.begin(), words.end(), std::size_t{0},
                                       [](std::size_t n, const std::string &w) { return n + w.size(); });
    // a round trip through text, as configuration code does
    return boost::lexical_cast<double>(boost::lexical_cast<std::string>(double(total) / double(words.size())));
}
