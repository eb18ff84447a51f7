// TLS settings: qemu-nbd's --object spelling and the JSON config's
// per-listener "tls" object, both strict.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "config/config.hpp"

using namespace qnbd::config;

namespace {

std::string objects_error(const std::vector<std::string>& objs, std::string_view creds, std::string_view authz = "") {
  auto r = tls_from_objects(objs, creds, authz);
  REQUIRE_MESSAGE(!r, "accepted");
  CHECK(r.error().message.find('\n') == std::string::npos);
  return r.error().message;
}

std::string config_error(std::string_view text) {
  auto r = parse_config(text);
  REQUIRE_MESSAGE(!r, "accepted: " << text);
  return r.error().message;
}

std::string with_listener(std::string_view listener) {
  return std::string(R"({"exports": [{"name": "", "image": "d.img"}], "listeners": [)") + std::string(listener) + "]}";
}

}  // namespace

TEST_CASE("--object tls-creds-x509 in qemu-nbd's spelling") {
  auto r = tls_from_objects({"tls-creds-x509,id=tls0,endpoint=server,dir=/etc/pki/qemu,verify-peer=off"}, "tls0", "");
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  CHECK(r->creds == "x509");
  CHECK(r->dir == "/etc/pki/qemu");
  CHECK(r->verify_peer == false);
  CHECK(r->id == "tls0");
  CHECK(r->authz.empty());
  // verify-peer defaults to on, as in qemu.
  auto d = tls_from_objects({"tls-creds-x509,id=a,dir=/x"}, "a", "");
  REQUIRE(d);
  CHECK(d->verify_peer);
}

TEST_CASE("--object tls-creds-psk and authz-simple with a DN holding doubled commas") {
  auto r = tls_from_objects({"tls-creds-psk,id=p,endpoint=server,dir=/k",
                             "authz-simple,id=auth0,identity=C=GB,,O=qnbd test,,CN=client1"},
                            "p", "auth0");
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  CHECK(r->creds == "psk");
  CHECK(r->authz_id == "auth0");
  REQUIRE(r->authz.size() == 1);
  CHECK(r->authz[0] == "C=GB,O=qnbd test,CN=client1");
  // qom-type= spelling works too.
  auto q = parse_qemu_object("qom-type=tls-creds-x509,id=t,dir=/d");
  REQUIRE(q);
  CHECK(q->qom_type == "tls-creds-x509");
}

TEST_CASE("--object refusals name the problem") {
  CHECK(objects_error({"tls-creds-x509,id=t,endpoint=client,dir=/d"}, "t").find("endpoint=server") !=
        std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,endpoint=server"}, "t").find("dir= is required") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,endpoint=server,dir=/d"}, "t").find("id= is required") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d,priority=NORMAL"}, "t").find("unsupported property 'priority'") !=
        std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d,verify-peer=maybe"}, "t").find("on or off") != std::string::npos);
  CHECK(objects_error({"secret,id=s,data=x"}, "s").find("unsupported type") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d", "tls-creds-psk,id=t,dir=/e"}, "t").find("used twice") !=
        std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d"}, "u").find("--tls-creds u") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d"}, "t", "nope").find("--tls-authz nope") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d,verify-peer=off", "authz-simple,id=a,identity=CN=x"}, "t", "a")
            .find("verify-peer=on") != std::string::npos);
  CHECK(objects_error({"authz-simple,id=a"}, "").find("identity= is required") != std::string::npos);
  CHECK(objects_error({"authz-simple,id=a,identity=CN=x"}, "", "a").find("needs --tls-creds") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir=/d,dir=/e"}, "t").find("given twice") != std::string::npos);
  CHECK(objects_error({"tls-creds-x509,id=t,dir"}, "t").find("not KEY=VALUE") != std::string::npos);
}

TEST_CASE("JSON: per-listener tls on a tcp listener beside a plaintext unix socket") {
  auto r = parse_config(with_listener(
      R"({"type": "tcp", "host": "0.0.0.0", "port": 10809,
          "tls": {"creds": "x509", "dir": "/etc/qnbd/tls", "authz": ["C=GB,O=qnbd test,CN=client1"]}},
         {"type": "unix", "path": "/run/qnbd.sock"})"));
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message));
  REQUIRE(r->listeners.size() == 2);
  CHECK(r->listeners[0].has_tls);
  CHECK(r->listeners[0].tls.creds == "x509");
  CHECK(r->listeners[0].tls.verify_peer);
  REQUIRE(r->listeners[0].tls.authz.size() == 1);
  CHECK(r->listeners[0].tls.authz[0] == "C=GB,O=qnbd test,CN=client1");
  CHECK_FALSE(r->listeners[1].has_tls);
  auto p = parse_config(with_listener(R"({"type": "unix", "path": "/s", "tls": {"creds": "psk", "dir": "k"}})"));
  REQUIRE(p);
  CHECK(p->listeners[0].tls.creds == "psk");
  auto l = parse_config(R"({"exports": [{"name": "", "image": "d"}], "limits": {"max_connections_per_address": 4}})");
  REQUIRE(l);
  CHECK(l->limits.max_connections_per_address == 4);
}

TEST_CASE("JSON: tls refusals carry the pointer") {
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"dir": "/d"}})")).find("/listeners/0/tls/creds") !=
        std::string::npos);
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"creds": "x509"}})")).find("/listeners/0/tls/dir") !=
        std::string::npos);
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"creds": "rsa", "dir": "/d"}})"))
            .find("/listeners/0/tls/creds") != std::string::npos);
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"creds": "psk", "dir": "/d", "verify_peer": false}})"))
            .find("/listeners/0/tls/verify_peer") != std::string::npos);
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"creds": "x509", "dir": "/d", "authz": []}})"))
            .find("/listeners/0/tls/authz") != std::string::npos);
  CHECK(config_error(
            with_listener(
                R"({"type": "tcp", "tls": {"creds": "x509", "dir": "/d", "verify_peer": false, "authz": ["CN=a"]}})"))
            .find("needs verify_peer") != std::string::npos);
  CHECK(config_error(with_listener(R"({"type": "tcp", "tls": {"creds": "x509", "dir": "/d", "priority": "x"}})"))
            .find("/listeners/0/tls/priority") != std::string::npos);
  CHECK(config_error(R"({"exports": [{"name": "", "image": "d"}], "limits": {"max_connections_per_address": -1}})")
            .find("/limits/max_connections_per_address") != std::string::npos);
}
