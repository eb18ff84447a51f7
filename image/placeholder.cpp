// placeholder so the library is never empty
namespace qnbd { [[maybe_unused]] static int image_placeholder; }
