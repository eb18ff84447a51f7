// The negotiated header style of a connection, shared by the handshake
// (which settles it) and the transmission-phase codec (which obeys it),
// so the codec does not depend on the Negotiator.
#pragma once

#include <cstdint>

namespace qnbd::protocol {

// Which request/reply headers the connection uses (NBD proto.md section
// "Transmission phase"): simple replies only, structured replies
// (NBD_OPT_STRUCTURED_REPLY), or extended headers (NBD_OPT_EXTENDED_HEADERS).
enum class ReplyMode : std::uint8_t { simple, structured, extended };

}  // namespace qnbd::protocol
