#include <iostream>

#include "app.h"

int main() {
    const std::string text = "Lazy pulling starts containers before their images are whole, "
                             "and the bytes a start needs are few";
    const auto words = split_words(text);
    const auto counts = count_words(words);
    std::cout << "hello from cxx: " << words.size() << " words, " << counts.size() << " distinct, mean length "
              << mean_length(words) << std::endl;
    return 0;
}
