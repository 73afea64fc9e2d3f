// PAC's standard helper functions (the ones Netscape defined and every browser and
// libproxy carries), written for ferry. dnsResolve, myIpAddress and alert are ferry's own
// natives; everything else is plain JavaScript over them.

function isPlainHostName(host) {
  return host.indexOf(".") < 0;
}

function dnsDomainIs(host, domain) {
  host = String(host).toLowerCase();
  domain = String(domain).toLowerCase();
  return host.length >= domain.length &&
    host.substring(host.length - domain.length) === domain;
}

function localHostOrDomainIs(host, hostdom) {
  host = String(host).toLowerCase();
  hostdom = String(hostdom).toLowerCase();
  return host === hostdom ||
    (host.indexOf(".") < 0 && hostdom.lastIndexOf(host + ".", 0) === 0);
}

function isResolvable(host) {
  return dnsResolve(host) !== null;
}

function dnsDomainLevels(host) {
  return String(host).split(".").length - 1;
}

// A dotted IPv4 address as a number, or null.
function __ferry_ip(addr) {
  var parts = String(addr).split(".");
  if (parts.length !== 4) return null;
  var n = 0;
  for (var i = 0; i < 4; i++) {
    var x = parseInt(parts[i], 10);
    if (isNaN(x) || x < 0 || x > 255 || String(x) !== parts[i]) return null;
    n = n * 256 + x;
  }
  return n;
}

function convert_addr(addr) {
  var n = __ferry_ip(addr);
  return n === null ? 0 : n;
}

function isInNet(host, pattern, mask) {
  var a = __ferry_ip(host);
  if (a === null) {
    var resolved = dnsResolve(host);
    if (resolved === null) return false;
    a = __ferry_ip(resolved);
  }
  var p = __ferry_ip(pattern), m = __ferry_ip(mask);
  if (a === null || p === null || m === null) return false;
  return ((a & m) >>> 0) === ((p & m) >>> 0);
}

function shExpMatch(str, shexp) {
  var re = "^" + String(shexp)
    .replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replace(/\*/g, ".*")
    .replace(/\?/g, ".") + "$";
  return new RegExp(re).test(String(str));
}

var __ferry_days = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
var __ferry_months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];

// The arguments without a trailing "GMT", and whether it was there.
function __ferry_args(args) {
  var a = Array.prototype.slice.call(args);
  var gmt = a.length > 0 && a[a.length - 1] === "GMT";
  if (gmt) a.pop();
  return { a: a, gmt: gmt, now: new Date() };
}

// Whether x lies in [lo, hi], wrapping past the end when lo > hi.
function __ferry_in(x, lo, hi) {
  return lo <= hi ? (x >= lo && x <= hi) : (x >= lo || x <= hi);
}

function weekdayRange() {
  var c = __ferry_args(arguments);
  var today = c.gmt ? c.now.getUTCDay() : c.now.getDay();
  var lo = __ferry_days.indexOf(c.a[0]);
  var hi = c.a.length > 1 ? __ferry_days.indexOf(c.a[1]) : lo;
  if (lo < 0 || hi < 0) return false;
  return __ferry_in(today, lo, hi);
}

function timeRange() {
  var c = __ferry_args(arguments);
  var d = c.now, g = c.gmt;
  var now = (g ? d.getUTCHours() : d.getHours()) * 3600 +
    (g ? d.getUTCMinutes() : d.getMinutes()) * 60 +
    (g ? d.getUTCSeconds() : d.getSeconds());
  var a = c.a.map(Number);
  var lo, hi;
  if (a.length === 1) { lo = a[0] * 3600; hi = lo + 3599; }
  else if (a.length === 2) { lo = a[0] * 3600; hi = a[1] * 3600 - 1; }
  else if (a.length === 4) { lo = a[0] * 3600 + a[1] * 60; hi = a[2] * 3600 + a[3] * 60 - 1; }
  else if (a.length === 6) { lo = a[0] * 3600 + a[1] * 60 + a[2]; hi = a[3] * 3600 + a[4] * 60 + a[5]; }
  else return false;
  if (hi < 0) hi += 86400;
  return __ferry_in(now, lo, hi % 86400);
}

function dateRange() {
  var c = __ferry_args(arguments);
  var d = c.now, g = c.gmt;
  var today = {
    d: g ? d.getUTCDate() : d.getDate(),
    m: g ? d.getUTCMonth() : d.getMonth(),
    y: g ? d.getUTCFullYear() : d.getFullYear()
  };
  // Each argument is a day (1-31), a month name or a year.
  var parts = c.a.map(function (x) {
    var mi = __ferry_months.indexOf(x);
    if (mi >= 0) return { k: "m", v: mi };
    var n = Number(x);
    return n > 31 ? { k: "y", v: n } : { k: "d", v: n };
  });
  var half = parts.length / 2;
  if (parts.length === 1) return today[parts[0].k] === parts[0].v;
  if (parts.length % 2 !== 0 || half > 3) return false;
  // An ordinal over the fields given, most significant first.
  var order = ["y", "m", "d"];
  var kinds = parts.slice(0, half).map(function (p) { return p.k; });
  function ord(ps, t) {
    var n = 0;
    order.forEach(function (k) {
      if (kinds.indexOf(k) < 0) return;
      var v = ps ? ps.filter(function (p) { return p.k === k; })[0].v : t[k];
      n = n * 10000 + v;
    });
    return n;
  }
  var lo = ord(parts.slice(0, half)), hi = ord(parts.slice(half)), now = ord(null, today);
  return kinds.indexOf("y") >= 0 ? (now >= lo && now <= hi) : __ferry_in(now, lo, hi);
}
