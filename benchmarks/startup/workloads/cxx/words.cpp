#include <algorithm>

#include <boost/algorithm/string.hpp>

#include "app.h"

std::vector<std::string> split_words(const std::string &text) {
    std::vector<std::string> words;
    std::string lower = boost::algorithm::to_lower_copy(text);
    boost::algorithm::split(words, lower, boost::algorithm::is_any_of(" ,."), boost::algorithm::token_compress_on);
    words.erase(std::remove_if(words.begin(), words.end(), [](const std::string &w) { return w.empty(); }),
                words.end());
    return words;
}

std::map<std::string, int> count_words(const std::vector<std::string> &words) {
    std::map<std::string, int> counts;
    for (const auto &w : words) {
        ++counts[boost::algorithm::trim_copy(w)];
    }
    return counts;
}
