// `--object TYPE,id=ID,key=value,...` in qemu-nbd's spelling (qemu's QemuOpts
// syntax: "," separates properties, ",," is a literal comma), restricted to
// what a TLS server needs: tls-creds-x509, tls-creds-psk and authz-simple.
#include <algorithm>
#include <map>

#include "config/config.hpp"

namespace qnbd::config {

const std::string* QemuObject::get(std::string_view key) const {
  for (const auto& [k, v] : props)
    if (k == key) return &v;
  return nullptr;
}

std::vector<std::string> split_qemu_opts(std::string_view text) {
  // Split at single commas; ",," stays as one comma inside the field.
  std::vector<std::string> fields(1);
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        fields.back() += ',';
        ++i;
        continue;
      }
      fields.emplace_back();
      continue;
    }
    fields.back() += text[i];
  }
  return fields;
}

Result<QemuObject> parse_qemu_object(std::string_view text) {
  if (text.size() > 64 * 1024) return make_error(EINVAL, "--object: longer than 64 KiB");
  const std::vector<std::string> fields = split_qemu_opts(text);
  QemuObject o;
  // qemu accepts the type either first or as qom-type=.
  std::size_t first = 0;
  if (fields[0].find('=') == std::string::npos) {
    o.qom_type = fields[0];
    first = 1;
  }
  for (std::size_t i = first; i < fields.size(); ++i) {
    const auto& f = fields[i];
    auto eq = f.find('=');
    if (eq == std::string::npos || eq == 0) return make_error(EINVAL, "--object {}: '{}' is not KEY=VALUE", text, f);
    std::string key = f.substr(0, eq), value = f.substr(eq + 1);
    if (key == "qom-type") {
      if (!o.qom_type.empty()) return make_error(EINVAL, "--object {}: the type is given twice", text);
      o.qom_type = value;
      continue;
    }
    if (o.get(key)) return make_error(EINVAL, "--object {}: property '{}' given twice", text, key);
    // authz-simple has one identity; tls-creds have single-valued keys.
    o.props.emplace_back(std::move(key), std::move(value));
  }
  if (o.qom_type.empty()) return make_error(EINVAL, "--object {}: no object type", text);
  const std::string* id = o.get("id");
  if (!id || id->empty()) return make_error(EINVAL, "--object {}: id= is required", text);
  return o;
}

namespace {

// qemu's boolean property spellings.
Result<bool> parse_bool(const QemuObject& o, std::string_view key, const std::string& v) {
  if (v == "on" || v == "yes" || v == "true") return true;
  if (v == "off" || v == "no" || v == "false") return false;
  return make_error(EINVAL, "--object {} id={}: {}={}: expected on or off", o.qom_type, *o.get("id"), key, v);
}

Result<void> only_keys(const QemuObject& o, std::initializer_list<std::string_view> allowed) {
  for (const auto& [k, v] : o.props) {
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end())
      return make_error(EINVAL, "--object {} id={}: unsupported property '{}'", o.qom_type, *o.get("id"), k);
  }
  return ok();
}

}  // namespace

Result<TlsConfig> tls_from_objects(const std::vector<std::string>& objects, std::string_view creds_id,
                                   std::string_view authz_id) {
  std::map<std::string, QemuObject, std::less<>> by_id;
  for (const auto& text : objects) {
    auto o = QNBD_TRY(parse_qemu_object(text));
    const std::string id = *o.get("id");
    if (o.qom_type == "tls-creds-x509") {
      QNBD_TRY(only_keys(o, {"id", "endpoint", "dir", "verify-peer"}));
    } else if (o.qom_type == "tls-creds-psk") {
      QNBD_TRY(only_keys(o, {"id", "endpoint", "dir"}));
    } else if (o.qom_type == "authz-simple") {
      QNBD_TRY(only_keys(o, {"id", "identity"}));
      if (!o.get("identity") || o.get("identity")->empty())
        return make_error(EINVAL, "--object authz-simple id={}: identity= is required", id);
    } else {
      return make_error(EINVAL,
                        "--object {}: unsupported type (qnbd knows tls-creds-x509, tls-creds-psk, authz-simple)",
                        o.qom_type);
    }
    if (o.qom_type != "authz-simple") {
      if (const auto* e = o.get("endpoint"); e && *e != "server")
        return make_error(EINVAL, "--object {} id={}: endpoint={}: a server needs endpoint=server", o.qom_type, id, *e);
      if (!o.get("dir") || o.get("dir")->empty())
        return make_error(EINVAL, "--object {} id={}: dir= is required", o.qom_type, id);
    }
    if (by_id.count(id)) return make_error(EINVAL, "--object {}: id '{}' is used twice", o.qom_type, id);
    by_id.emplace(id, std::move(o));
  }
  if (creds_id.empty()) {
    if (!authz_id.empty()) return make_error(EINVAL, "--tls-authz needs --tls-creds");
    return make_error(ENOENT, "no --tls-creds");
  }
  auto it = by_id.find(creds_id);
  if (it == by_id.end() || it->second.qom_type == "authz-simple")
    return make_error(EINVAL, "--tls-creds {}: no --object tls-creds-x509/tls-creds-psk with that id", creds_id);
  const auto& c = it->second;
  TlsConfig t;
  t.id = std::string(creds_id);
  t.creds = c.qom_type == "tls-creds-x509" ? "x509" : "psk";
  t.dir = *c.get("dir");
  if (const auto* vp = c.get("verify-peer")) {
    bool b = QNBD_TRY(parse_bool(c, "verify-peer", *vp));
    t.verify_peer = b;
  }
  if (!authz_id.empty()) {
    auto a = by_id.find(authz_id);
    if (a == by_id.end() || a->second.qom_type != "authz-simple")
      return make_error(EINVAL, "--tls-authz {}: no --object authz-simple with that id", authz_id);
    if (t.creds == "x509" && !t.verify_peer)
      return make_error(EINVAL, "--tls-authz {}: needs verify-peer=on (an unverified certificate proves no identity)",
                        authz_id);
    t.authz_id = std::string(authz_id);
    t.authz.push_back(*a->second.get("identity"));
  }
  return t;
}

}  // namespace qnbd::config
