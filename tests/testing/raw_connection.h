// A bare UCX connection to kvmemd that sends arbitrary bytes as a request and returns the
// reply envelope's status: lets tests (and the fuzz corpus generator) send what the client
// library never would.
#pragma once

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "wire/framing.h"
#include "wire/ucx.h"

namespace kvmem::testing {

class RawConnection {
 public:
  struct ReplyInfo {
    bool received = false;
    uint64_t request_id = 0;
    Status status;
    wire::Body body = wire::Body::NONE;
  };

  Status Connect(const std::string& address, const std::string& tls = "") {
    KVMEM_ASSIGN_OR_RETURN(context_, ucx::CreateContext({tls, false}));
    KVMEM_ASSIGN_OR_RETURN(worker_, ucx::CreateWorker(context_.get(), UCS_THREAD_MODE_SINGLE));
    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    am.id = wire::kReplyAmId;
    am.cb = &RawConnection::OnReply;
    am.arg = this;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    KVMEM_RETURN_IF_ERROR(ucx::FromUcs(ucp_worker_set_am_recv_handler(worker_.get(), &am), "am handler"));
    std::string host;
    uint16_t port = 0;
    KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(address, &host, &port));
    sockaddr_storage addr{};
    socklen_t len = 0;
    KVMEM_RETURN_IF_ERROR(ucx::ResolveSockaddr(host, port, &addr, &len));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    ep.sockaddr.addrlen = len;
    ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    return ucx::FromUcs(ucp_ep_create(worker_.get(), &ep, &ep_), "connect");
  }

  ~RawConnection() {
    if (ep_) ucx::CloseEndpoint(worker_.get(), ep_, true, 200);
  }

  // Sends header + data and waits up to timeout for the reply.
  ReplyInfo Send(const std::vector<uint8_t>& header, const std::vector<uint8_t>& data,
                 int timeout_ms = 3000) {
    reply_ = ReplyInfo{};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    ucs_status_ptr_t req = ucp_am_send_nbx(ep_, wire::kRequestAmId, header.data(), header.size(),
                                           data.empty() ? nullptr : data.data(), data.size(), &p);
    Status st = ucx::WaitRequest(worker_.get(), req, "send");
    if (!st.ok()) {
      reply_.status = st;
      return reply_;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!reply_.received && std::chrono::steady_clock::now() < deadline) ucp_worker_progress(worker_.get());
    return reply_;
  }

  // Convenience: a finished builder as header, plus data.
  ReplyInfo Send(const flatbuffers::FlatBufferBuilder& fbb, const std::vector<uint8_t>& data = {}) {
    return Send(std::vector<uint8_t>(fbb.GetBufferPointer(), fbb.GetBufferPointer() + fbb.GetSize()), data);
  }

 private:
  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data, size_t length,
                              const ucp_am_recv_param_t* param) {
    auto* self = static_cast<RawConnection*>(arg);
    const auto* h = static_cast<const uint8_t*>(header);
    self->reply_.received = true;
    flatbuffers::Verifier v(h, header_length);
    if (header_length < 8 || !wire::VerifyEnvelopeBuffer(v)) {
      self->reply_.status = DataLoss("reply header does not verify");
      return UCS_OK;
    }
    const wire::Envelope* env = wire::GetEnvelope(h);
    self->reply_.request_id = env->request_id();
    self->reply_.status = wire::EnvelopeStatus(env);  // replies that spill are never errors
    self->reply_.body = env->body_type();
    return UCS_OK;
  }

  ucx::Context context_;
  ucx::Worker worker_;
  ucp_ep_h ep_ = nullptr;
  ReplyInfo reply_;
};

}  // namespace kvmem::testing
