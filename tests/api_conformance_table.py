"""The public API of hivemind 1.1.12, transcribed by hand from its reference: names, signatures and constants.

``SIGNATURES`` holds one line per callable: optional markers (``async``, ``classmethod``, ``staticmethod``), the
dotted path and the parameter list as the reference writes it (``self``/``cls`` left out; a class stands for its
constructor). A default written as ``...`` means "has some default". ``PROPERTIES`` are descriptors reached on the
class, ``NAMES`` must merely resolve, ``VALUES`` must equal the given value, ``SAME`` pairs must be one object.
Used by tests/test_api_conformance_signatures.py.
"""

# markers: ``async`` coroutine function, ``asyncgen`` async generator function, ``positional``: the reference names
# the positional parameters informally (``set_result(x)``), so they are matched by position, not by name
SIGNATURES = """
hivemind.dht.DHT(initial_peers=None, *, start, p2p=None, daemon=True, num_workers=DEFAULT_NUM_WORKERS, \
record_validators=(), shutdown_timeout=3, await_ready=True, **kwargs)
hivemind.dht.DHT.run_in_background(await_ready=True, timeout=None)
hivemind.dht.DHT.wait_until_ready(timeout=None)
hivemind.dht.DHT.shutdown()
hivemind.dht.DHT.get(key, latest=False, return_future=False, **kwargs)
hivemind.dht.DHT.store(key, value, expiration_time, subkey=None, return_future=False, **kwargs)
hivemind.dht.DHT.run_coroutine(coro, return_future=False)
hivemind.dht.DHT.add_validators(record_validators)
hivemind.dht.DHT.get_visible_maddrs(latest=False)
async hivemind.dht.DHT.replicate_p2p()
async classmethod hivemind.dht.DHTNode.create(p2p=None, node_id=None, initial_peers=None, bucket_size=20, \
num_replicas=5, depth_modulo=5, parallel_rpc=None, wait_timeout=3, refresh_timeout=None, bootstrap_timeout=None, \
cache_locally=True, cache_nearest=1, cache_size=None, cache_refresh_before_expiry=5, cache_on_store=True, \
reuse_get_requests=True, num_workers=DEFAULT_NUM_WORKERS, chunk_size=16, blacklist_time=5.0, backoff_rate=2.0, \
client_mode=False, record_validator=None, authorizer=None, ensure_bootstrap_success=True, strict=True, **kwargs)
async hivemind.dht.DHTNode.store(key, value, expiration_time, subkey=None, **kwargs)
async hivemind.dht.DHTNode.store_many(keys, values, expiration_time, subkeys=None, exclude_self=False, \
await_all_replicas=True, **kwargs)
async hivemind.dht.DHTNode.get(key, latest=False, **kwargs)
async hivemind.dht.DHTNode.get_many(keys, sufficient_expiration_time=None, **kwargs)
async hivemind.dht.DHTNode.get_many_by_id(key_ids, sufficient_expiration_time=None, num_workers=None, \
beam_size=None, return_futures=False)
async hivemind.dht.DHTNode.find_nearest_nodes(queries, k_nearest=None, beam_size=None, num_workers=None, \
node_to_peer_id=None, exclude_self=False, **kwargs)
async hivemind.dht.DHTNode.get_visible_maddrs(latest=False)
async hivemind.dht.DHTNode.shutdown()
classmethod hivemind.dht.DHTID.generate(source=None, nbits=255)
hivemind.dht.DHTID.xor_distance(other)
classmethod hivemind.dht.DHTID.longest_common_prefix_length(*ids)
hivemind.dht.DHTID.to_bytes()
classmethod hivemind.dht.DHTID.from_bytes(raw)
hivemind.utils.timed_storage.ValueWithExpiration(value, expiration_time)
hivemind.utils.TimedStorage(maxsize=None)
hivemind.utils.TimedStorage.store(key, value, expiration_time)
hivemind.utils.TimedStorage.get(key)
hivemind.utils.TimedStorage.items()
hivemind.utils.TimedStorage.top()
hivemind.utils.TimedStorage.clear()
hivemind.utils.TimedStorage.freeze()
positional hivemind.dht.storage.DHTLocalStorage.store(key_id, value, expiration_time, subkey=None)
hivemind.utils.get_dht_time()
hivemind.dht.validation.DHTRecord(key, subkey, value, expiration_time)
hivemind.dht.validation.RecordValidatorBase.validate(record)
hivemind.dht.validation.RecordValidatorBase.sign_value(record)
hivemind.dht.validation.RecordValidatorBase.strip_value(record)
hivemind.dht.validation.RecordValidatorBase.merge_with(other)
hivemind.dht.validation.CompositeValidator(validators=())
hivemind.dht.validation.CompositeValidator.extend(validators)
hivemind.dht.crypto.RSASignatureValidator(private_key=None)
hivemind.dht.schema.SchemaValidator(schema, allow_extra_keys=True, prefix=None)
hivemind.dht.schema.conbytes(*, regex=None, **kwargs)
async hivemind.dht.protocol.DHTProtocol.call_ping(peer, validate=False, strict=True)
async hivemind.dht.protocol.DHTProtocol.call_store(peer, keys, values, expiration_time, subkeys=None, in_cache=None)
async hivemind.dht.protocol.DHTProtocol.call_find(peer, keys)
hivemind.dht.routing.RoutingTable(node_id, bucket_size, depth_modulo)
hivemind.dht.routing.RoutingTable.get_nearest_neighbors(query_id, k, exclude=None)
async classmethod hivemind.p2p.P2P.create(initial_peers=None, *, announce_maddrs=None, auto_nat=True, \
conn_manager=True, dht_mode="server", force_reachability=None, host_maddrs=("/ip4/127.0.0.1/tcp/0",), \
identity_path=None, idle_timeout=30, nat_port_map=True, relay_hop_limit=0, startup_timeout=15, tls=True, \
use_auto_relay=False, use_ipfs=False, use_relay=True, persistent_conn_max_msg_size=4 * 1024**2, quic=None, \
use_relay_hop=None, use_relay_discovery=None, check_if_identity_free=True, no_listen=False, trusted_relays=None)
async classmethod hivemind.p2p.P2P.replicate(daemon_listen_maddr)
async classmethod hivemind.p2p.P2P.is_identity_taken(identity_path, *, initial_peers, tls, use_auto_relay, \
use_ipfs, use_relay)
staticmethod hivemind.p2p.P2P.generate_identity(identity_path)
async hivemind.p2p.P2P.get_visible_maddrs(latest=False)
async hivemind.p2p.P2P.list_peers()
async hivemind.p2p.P2P.wait_for_at_least_n_peers(n_peers, attempts=3, delay=1)
async hivemind.p2p.P2P.add_protobuf_handler(name, handler, input_protobuf_type, *, stream_input=False, \
stream_output=False, balanced=False)
async hivemind.p2p.P2P.remove_protobuf_handler(name, *, stream_input=False, stream_output=False)
async hivemind.p2p.P2P.call_protobuf_handler(peer_id, name, input, output_protobuf_type)
async hivemind.p2p.P2P.iterate_protobuf_handler(peer_id, name, input, output_protobuf_type)
async hivemind.p2p.P2P.add_binary_stream_handler(name, handler, balanced=False)
async hivemind.p2p.P2P.remove_binary_stream_handler(name)
async hivemind.p2p.P2P.call_binary_stream_handler(peer_id, handler_name)
async staticmethod hivemind.p2p.P2P.send_raw_data(...)
async staticmethod hivemind.p2p.P2P.receive_raw_data(...)
async staticmethod hivemind.p2p.P2P.send_protobuf(...)
async staticmethod hivemind.p2p.P2P.receive_protobuf(...)
async hivemind.p2p.P2P.shutdown()
hivemind.p2p.P2PContext(handle_name, local_id, remote_id=None)
hivemind.p2p.PeerID(peer_id_bytes)
hivemind.p2p.PeerID.to_bytes()
hivemind.p2p.PeerID.to_base58()
hivemind.p2p.PeerID.pretty()
hivemind.p2p.PeerID.to_string()
classmethod hivemind.p2p.PeerID.from_base58(...)
classmethod hivemind.p2p.PeerID.from_identity(...)
hivemind.p2p.PeerInfo(peer_id, addrs)
hivemind.p2p.p2p_daemon_bindings.datastructures.StreamInfo(peer_id, addr, proto)
async hivemind.p2p.ServicerBase.add_p2p_handlers(p2p, wrapper=None, *, namespace=None, balanced=False)
async hivemind.p2p.ServicerBase.remove_p2p_handlers(p2p, *, namespace=None)
classmethod hivemind.p2p.ServicerBase.get_stub(p2p, peer, *, namespace=None)
hivemind.moe.expert_uid.ExpertInfo(uid, peer_id)
hivemind.moe.expert_uid.is_valid_uid(...)
hivemind.moe.expert_uid.is_valid_prefix(...)
hivemind.moe.expert_uid.split_uid(uid_or_prefix)
hivemind.moe.RemoteExpert(expert_info, p2p)
hivemind.moe.RemoteExpert.forward(*args, **kwargs)
hivemind.moe.client.expert.create_remote_experts(infos, dht, return_future=False)
hivemind.moe.client.expert.batch_create_remote_experts(infos, dht, return_future=False)
hivemind.moe.client.expert.get_server_stub(p2p, server_peer_id)
classmethod hivemind.moe.client.remote_expert_worker.RemoteExpertWorker.run_coroutine(coro, return_future=False)
hivemind.moe.RemoteMixtureOfExperts(*, in_features, grid_size, dht, uid_prefix, k_best, k_min=1, \
forward_timeout=None, timeout_after_k_min=None, backward_k_min=1, backward_timeout=None, detect_anomalies=False, \
allow_zero_outputs=False, **dht_kwargs)
hivemind.moe.RemoteMixtureOfExperts.forward(input, *args, **kwargs)
hivemind.moe.RemoteMixtureOfExperts.compute_expert_scores(grid_scores, batch_experts)
hivemind.moe.RemoteSwitchMixtureOfExperts(*, grid_size, utilization_alpha=0.9, grid_dropout=1.0, jitter_eps=1e-2, \
k_best=1, k_min=0, backward_k_min=0, allow_zero_outputs=True, **kwargs)
hivemind.moe.RemoteSwitchMixtureOfExperts.forward(input, *args, **kwargs)
hivemind.moe.client.beam_search.MoEBeamSearcher(dht, uid_prefix, grid_size, num_workers=None, \
negative_caching=True, cache_expiration=300, **kwargs)
hivemind.moe.client.beam_search.MoEBeamSearcher.get_initial_beam(scores, beam_size, return_future=False)
hivemind.moe.client.beam_search.MoEBeamSearcher.get_active_successors(prefixes, grid_size=None, return_future=False)
hivemind.moe.client.beam_search.MoEBeamSearcher.find_best_experts(grid_scores, beam_size, return_future=False)
hivemind.moe.client.beam_search.MoEBeamSearcher.batch_find_best_experts(batch_grid_scores, beam_size, \
return_future=False)
hivemind.moe.Server(dht, module_backends, num_connection_handlers=1, update_period=30, expiration=None, start=False, \
checkpoint_dir=None, **kwargs)
classmethod hivemind.moe.Server.create(num_experts=None, expert_uids=None, expert_pattern=None, expert_cls="ffn", \
hidden_dim=1024, optim_cls=torch.optim.Adam, scheduler="none", num_warmup_steps=None, num_training_steps=None, \
clip_grad_norm=None, num_handlers=None, min_batch_size=1, max_batch_size=4096, device=None, initial_peers=(), \
checkpoint_dir=None, compression=CompressionType.NONE, stats_report_interval=None, custom_module_path=None, \
update_period=30, expiration=None, *, start, **kwargs)
hivemind.moe.Server.run()
hivemind.moe.Server.run_in_background(await_ready=True, timeout=None)
hivemind.moe.Server.shutdown()
hivemind.moe.server.background_server(*args, shutdown_timeout=5, **kwargs)
hivemind.moe.ModuleBackend(name, module, *, optimizer=None, scheduler=None, args_schema=None, kwargs_schema=None, \
outputs_schema=None, **kwargs)
hivemind.moe.ModuleBackend.forward(*flat_inputs)
hivemind.moe.ModuleBackend.backward(*flat_inputs_and_grad_outputs)
hivemind.moe.ModuleBackend.on_backward(batch_size)
hivemind.moe.ModuleBackend.get_info()
hivemind.moe.ModuleBackend.get_pools()
hivemind.moe.declare_experts(dht, uids, expiration_time, wait=True)
hivemind.moe.get_experts(dht, uids, expiration_time=None, return_future=False)
hivemind.moe.server.dht_handler.DHTHandlerThread(module_backends, dht, update_period=30, expiration=None, \
**thread_kwargs)
hivemind.moe.register_expert_class(name, sample_input)
hivemind.moe.server.layers.add_custom_models_from_file(path)
hivemind.moe.server.runtime.Runtime(module_backends, prefetch_batches=64, sender_threads=1, device=None, \
stats_report_interval=None)
hivemind.moe.server.runtime.Runtime.run()
hivemind.moe.server.runtime.Runtime.shutdown()
hivemind.moe.server.task_pool.TaskPool(process_func, max_batch_size, name, min_batch_size=1, timeout=None, \
pool_size=None, prefetch_batches=1, daemon=True, start=False)
hivemind.moe.server.task_pool.TaskPool.submit_task(*tensors)
hivemind.moe.server.connection_handler.ConnectionHandler(dht, module_backends, *, balanced=True, \
shutdown_timeout=3, start=False)
hivemind.moe.server.checkpoints.CheckpointSaver(module_backends, checkpoint_dir, update_period)
positional hivemind.moe.server.checkpoints.store_experts(experts, dir)
positional hivemind.moe.server.checkpoints.load_experts(experts, dir)
hivemind.moe.server.checkpoints.is_directory(...)
hivemind.moe.server.layers.optim.ClippingWrapper(optim, clip_grad_norm)
hivemind.averaging.DecentralizedAverager(averaged_tensors, dht, *, start, prefix, target_group_size=None, \
min_group_size=2, initial_group_bits="", min_matchmaking_time=5.0, request_timeout=3.0, averaging_alpha=1.0, \
part_size_bytes=2**19, allreduce_timeout=None, next_chunk_timeout=None, sender_timeout=None, reducer_timeout=None, \
compression=NoCompression(), state_compression=NoCompression(), tensor_infos=None, bandwidth=None, \
min_vector_size=0, auxiliary=False, allow_state_sharing=None, declare_state_period=30, client_mode=None, \
daemon=True, shutdown_timeout=5)
hivemind.averaging.DecentralizedAverager.step(gather=None, scheduled_time=None, weight=None, timeout=None, \
allow_retries=True, require_trigger=False, wait=True)
hivemind.averaging.DecentralizedAverager.get_tensors()
hivemind.averaging.DecentralizedAverager.load_state_from_peers(wait=True, timeout=None)
hivemind.averaging.DecentralizedAverager.get_current_state()
hivemind.averaging.DecentralizedAverager.get_group_bits(wait=True)
hivemind.averaging.DecentralizedAverager.set_group_bits(group_bits, wait=True)
hivemind.averaging.DecentralizedAverager.run_in_background(await_ready=True, timeout=None)
hivemind.averaging.DecentralizedAverager.wait_until_ready(timeout=None)
hivemind.averaging.DecentralizedAverager.shutdown()
hivemind.averaging.control.StepControl.allow_allreduce()
hivemind.averaging.control.StepControl.get_timeout()
hivemind.averaging.control.StepControl.cancel()
hivemind.averaging.allreduce.AllReduceRunner(*, p2p, servicer_type, prefix, group_id, tensors, weight=None, \
ordered_peer_ids, peer_fractions, modes=None, sender_timeout=None, reducer_timeout=None, **container_kwargs)
hivemind.averaging.group_info.GroupInfo(group_id, peer_ids, gathered)
hivemind.averaging.load_balancing.load_balance_peers(vector_size, bandwidths, min_size=0)
hivemind.averaging.averager.compute_schema_hash(tensors)
hivemind.Optimizer(*, dht, run_id, target_batch_size, batch_size_per_step=None, optimizer, params=None, \
scheduler=None, matchmaking_time=15.0, averaging_timeout=60.0, allreduce_timeout=None, next_chunk_timeout=None, \
load_state_timeout=600.0, reuse_grad_buffers=False, offload_optimizer=None, delay_optimizer_step=None, \
delay_grad_averaging=False, delay_state_averaging=True, average_state_every=1, use_local_updates=False, \
client_mode=None, auxiliary=False, grad_compression=NoCompression(), grad_averager_factory=..., \
state_averaging_compression=NoCompression(), load_state_compression=NoCompression(), average_opt_statistics=(), \
extra_tensors=(), averager_opts=None, tracker_opts=None, performance_ema_alpha=0.1, shutdown_timeout=5, \
verbose=False)
hivemind.Optimizer.step(closure=None, batch_size=None, grad_scaler=None)
hivemind.Optimizer.zero_grad(set_to_none=...)
hivemind.Optimizer.load_state_from_peers(**kwargs)
hivemind.Optimizer.is_synchronized_with_peers()
hivemind.Optimizer.state_dict()
hivemind.Optimizer.load_state_dict(state_dict)
hivemind.Optimizer.add_param_group(param_group)
hivemind.Optimizer.shutdown()
hivemind.GradScaler.unscale_(optimizer)
hivemind.GradScaler.update(new_scale=None)
hivemind.GradScaler.are_grads_finite(optimizer, use_cached=False)
hivemind.GradScaler.running_global_step()
hivemind.optim.progress_tracker.ProgressTracker(dht, prefix, target_batch_size, *, client_mode=None, \
min_refresh_period=0.5, max_refresh_period=10, default_refresh_period=3, expected_drift_peers=3, \
expected_drift_rate=0.2, performance_ema_alpha=0.1, metadata_expiration=60.0, status_loglevel=logging.DEBUG, \
private_key=None, daemon=True, start)
hivemind.optim.progress_tracker.ProgressTracker.report_local_progress(local_epoch, samples_accumulated, \
update_global_samples=True)
hivemind.optim.progress_tracker.ProgressTracker.pause_updates()
hivemind.optim.progress_tracker.ProgressTracker.update_epoch(new_epoch=None)
hivemind.optim.progress_tracker.ProgressTracker.shutdown(timeout=None)
hivemind.optim.progress_tracker.GlobalTrainingProgress(epoch, samples_accumulated, target_batch_size, num_peers, \
num_clients, eta_next_epoch, next_fetch_time)
hivemind.optim.state_averager.TrainingStateAverager(*, dht, optimizer, params=None, scheduler=None, \
initialize_optimizer=None, offload_optimizer=False, custom_gradients=False, reuse_tensors=None, \
delta_rule_averaging=False, performance_ema_alpha=0.1, sync_epoch_when_averaging=False, parameter_names=None, \
average_opt_statistics=(), extra_tensors=(), status_loglevel=logging.DEBUG, **averager_kwargs)
hivemind.optim.state_averager.TrainingStateAverager.step(wait_for_delayed_updates=None, apply_delayed_updates=True, \
increment_epoch=False, optimizer_step=False, zero_grad=False, delay_optimizer_step=False, averaging_round=False, \
delay_averaging=None, averaging_control=None, wait_for_trigger=None, grad_scaler=None, set_to_none=..., \
averaging_opts=None)
hivemind.optim.state_averager.TrainingStateAverager.schedule_step(scheduled_time=None, **kwargs)
hivemind.optim.state_averager.TrainingStateAverager.load_state_from_peers(**kwargs)
hivemind.optim.state_averager.TrainingStateAverager.get_current_state()
hivemind.optim.state_averager.initialize_optimizer_state_(opt)
hivemind.optim.state_averager.dump_optimizer_state(opt)
hivemind.optim.state_averager.load_optimizer_state(opt, flat_metadata, flat_tensors)
hivemind.optim.grad_averager.GradientAverager(parameters, *, dht, prefix, reuse_grad_buffers=False, \
accumulate_grads_on=None, client_mode=None, warn=True, averaged_grads=(), **averager_kwargs)
hivemind.optim.grad_averager.GradientAverager.accumulate_grads_(batch_size)
hivemind.optim.grad_averager.GradientAverager.schedule_step(scheduled_time=None, **kwargs)
hivemind.optim.grad_averager.GradientAverager.step(weight=None, reset_accumulators=True, control=None, \
timeout=None, wait=True, **kwargs)
hivemind.optim.grad_averager.GradientAverager.load_accumulators_into_averager_()
hivemind.optim.grad_averager.GradientAverager.reset_accumulated_grads_()
hivemind.optim.grad_averager.GradientAverager.use_averaged_gradients()
hivemind.optim.grad_averager.GradientAverager.notify_used_averaged_gradients()
hivemind.optim.power_sgd_averager.PowerSGDGradientAverager(parameters, averager_rank, *, dht, prefix, \
reuse_grad_buffers=False, accumulate_grads_on=None, client_mode=None, warn=True, min_compression_ratio=0.5, \
averaged_grads=None, **kwargs)
hivemind.TrainingAverager(opt, *, average_parameters, average_gradients, average_opt_statistics=(), \
extra_tensors=(), parameter_names=None, initialize_optimizer=True, **averager_kwargs)
hivemind.TrainingAverager.step(data_lock=None, wait=True, **step_kwargs)
hivemind.compression.CompressionBase.compress(tensor, info, allow_inplace=False)
positional hivemind.compression.CompressionBase.extract(serialized)
hivemind.compression.CompressionBase.estimate_compression_ratio(info)
hivemind.compression.CompressionInfo(key, descriptor, role=TensorRole.UNSPECIFIED, part_index=0, part_size=None)
classmethod hivemind.compression.CompressionInfo.from_tensor(tensor, key=None, descriptor=None, **kwargs)
hivemind.compression.CompressionInfo.get_part(part_index, part_size)
hivemind.compression.NoCompression()
hivemind.compression.Float16Compression()
hivemind.compression.ScaledFloat16Compression()
hivemind.compression.Uniform8BitQuantization()
hivemind.compression.Quantile8BitQuantization()
hivemind.compression.SizeAdaptiveCompression(threshold, less, greater_equal)
hivemind.compression.RoleAdaptiveCompression(*, activation=None, parameter=None, gradient=None, optimizer=None, \
default=NoCompression())
hivemind.compression.PerTensorCompression(tensor_compressions)
hivemind.compression.serialize_torch_tensor(tensor, compression_type=CompressionType.NONE, info=None, \
allow_inplace=False, **kwargs)
positional hivemind.compression.deserialize_torch_tensor(serialized)
async hivemind.compression.deserialize_tensor_stream(stream)
hivemind.utils.get_logger(name=None)
classmethod hivemind.utils.MSGPackSerializer.dumps(obj)
classmethod hivemind.utils.MSGPackSerializer.loads(buf)
classmethod hivemind.utils.MSGPackSerializer.ext_serializable(type_code)
hivemind.utils.TensorDescriptor(size, dtype=None, layout=torch.strided, device=None, requires_grad=False, \
pin_memory=False, compression=CompressionType.NONE)
hivemind.utils.TensorDescriptor.numel()
classmethod hivemind.utils.TensorDescriptor.from_tensor(tensor)
hivemind.utils.TensorDescriptor.make_zeros(**kwargs)
hivemind.utils.nested_flatten(t)
hivemind.utils.nested_pack(flat, structure)
hivemind.utils.nested_map(fn, *t)
hivemind.utils.PerformanceEMA(alpha=0.1, eps=1e-20, paused=False)
hivemind.utils.PerformanceEMA.update(task_size, interval=None)
hivemind.utils.PerformanceEMA.reset_timer()
hivemind.utils.PerformanceEMA.pause()
hivemind.utils.PerformanceEMA.update_threadsafe(task_size)
asyncgen hivemind.utils.as_aiter(*values)
hivemind.utils.amap_in_executor(func, *aiters, max_prefetch=1, executor=None)
hivemind.utils.switch_to_uvloop()
positional hivemind.utils.enter_asynchronously(ctx)
hivemind.utils.tensor_descr.BatchTensorDescriptor(*instance_size, **kwargs)
classmethod hivemind.utils.tensor_descr.BatchTensorDescriptor.from_tensor(tensor, compression=CompressionType.NONE)
hivemind.utils.tensor_descr.BatchTensorDescriptor.make_zeros(*batch_size, **kwargs)
hivemind.utils.logging.use_hivemind_log_handler(where)
hivemind.utils.logging.golog_level_to_python(level)
hivemind.utils.logging.python_level_to_golog(level)
hivemind.utils.networking.choose_ip_address(maddrs, prefer_global=True, protocol_priority=("ip4", "ip6"))
hivemind.utils.networking.log_visible_maddrs(visible_maddrs, only_p2p)
hivemind.utils.limits.increase_file_limit(new_soft=2**15, new_hard=2**15)
positional hivemind.utils.streaming.split_for_streaming(tensor_msg, chunk_size_bytes=2**16)
positional hivemind.utils.streaming.combine_from_streaming(parts)
hivemind.utils.crypto.RSAPrivateKey()
hivemind.utils.crypto.RSAPrivateKey.sign(data)
positional hivemind.utils.crypto.RSAPublicKey.verify(data, sig)
classmethod hivemind.utils.crypto.RSAPrivateKey.process_wide()
hivemind.utils.MPFuture(*, use_lock=True)
hivemind.utils.MPFuture.result(timeout=None)
hivemind.utils.MPFuture.exception(timeout=None)
hivemind.utils.MPFuture.done()
hivemind.utils.MPFuture.running()
hivemind.utils.MPFuture.cancelled()
hivemind.utils.MPFuture.cancel()
positional hivemind.utils.MPFuture.set_result(x)
positional hivemind.utils.MPFuture.set_exception(e)
hivemind.utils.MPFuture.set_running_or_notify_cancel()
hivemind.utils.MPFuture.add_done_callback(fn)
"""

PROPERTIES = """
hivemind.dht.DHT.peer_id hivemind.dht.DHT.client_mode hivemind.dht.validation.RecordValidatorBase.priority
hivemind.dht.crypto.RSASignatureValidator.local_public_key hivemind.p2p.P2P.daemon_listen_maddr
hivemind.p2p.P2P.is_alive hivemind.moe.RemoteExpert.uid hivemind.moe.RemoteExpert.peer_id
hivemind.moe.RemoteExpert.stub hivemind.moe.RemoteExpert.info hivemind.moe.RemoteMixtureOfExperts.info
hivemind.moe.Server.ready hivemind.averaging.DecentralizedAverager.allow_state_sharing
hivemind.averaging.DecentralizedAverager.peer_id hivemind.averaging.DecentralizedAverager.state_sharing_priority
hivemind.averaging.DecentralizedAverager.request_timeout hivemind.averaging.control.StepControl.triggered
hivemind.averaging.control.StepControl.scheduled_time hivemind.averaging.control.StepControl.weight
hivemind.averaging.control.StepControl.stage hivemind.averaging.control.StepControl.began_allreduce
hivemind.averaging.control.StepControl.data_for_gather hivemind.averaging.control.StepControl.deadline
hivemind.averaging.control.StepControl.allow_retries hivemind.averaging.group_info.GroupInfo.group_size
hivemind.Optimizer.local_epoch hivemind.Optimizer.local_progress hivemind.Optimizer.use_local_updates
hivemind.Optimizer.use_gradient_averaging hivemind.Optimizer.state hivemind.Optimizer.opt
hivemind.Optimizer.param_groups hivemind.optim.progress_tracker.ProgressTracker.global_epoch
hivemind.optim.progress_tracker.ProgressTracker.ready_to_update_epoch
hivemind.optim.progress_tracker.ProgressTracker.estimated_next_update_time hivemind.utils.TensorDescriptor.shape
"""
SETTABLE = """
hivemind.averaging.DecentralizedAverager.allow_state_sharing
hivemind.averaging.DecentralizedAverager.state_sharing_priority
hivemind.averaging.control.StepControl.scheduled_time hivemind.averaging.control.StepControl.weight
"""

NAMES = """
hivemind.dht.DHTValue hivemind.dht.routing.DHTKey hivemind.dht.routing.Subkey hivemind.dht.routing.DHTValue
hivemind.dht.routing.BinaryDHTValue hivemind.utils.timed_storage.DHTExpiration hivemind.utils.ValueWithExpiration
hivemind.dht.storage.DictionaryDHTValue hivemind.dht.storage.DHTLocalStorage.store_subkey
hivemind.dht.schema.RSASignatureValidator hivemind.dht.schema.BytesWithPublicKey
hivemind.dht.protocol.DHTProtocol.rpc_ping hivemind.dht.protocol.DHTProtocol.rpc_store
hivemind.dht.protocol.DHTProtocol.rpc_find hivemind.dht.protocol.ValidationError
hivemind.dht.routing.RoutingTable.add_or_update_node hivemind.dht.routing.RoutingTable.get
hivemind.dht.routing.KBucket hivemind.dht.traverse.traverse_dht hivemind.dht.traverse.simple_traverse_dht
hivemind.dht.DHT.is_alive hivemind.dht.DHT.start hivemind.dht.DHT.join hivemind.dht.DHT.pid
hivemind.p2p.P2PDaemonError hivemind.p2p.P2PHandlerError hivemind.p2p.StubBase
hivemind.p2p.p2p_daemon_bindings.utils.ControlFailure hivemind.p2p.p2p_daemon_bindings.utils.DispatchFailure
hivemind.p2p.P2P.DHT_MODE_MAPPING hivemind.p2p.P2P.FORCE_REACHABILITY_MAPPING hivemind.moe.expert_uid.ExpertUID
hivemind.moe.expert_uid.ExpertPrefix hivemind.moe.expert_uid.Coordinate hivemind.moe.expert_uid.Score
hivemind.moe.expert_uid.UID_PATTERN hivemind.moe.expert_uid.PREFIX_PATTERN hivemind.moe.background_server
hivemind.moe.server.layers.name_to_block hivemind.moe.server.layers.name_to_input
hivemind.moe.server.layers.schedule_name_to_scheduler hivemind.moe.ModuleBackend.state_dict
hivemind.moe.ModuleBackend.load_state_dict hivemind.averaging.averager.AveragingMode
hivemind.averaging.partition.AllreduceException hivemind.averaging.partition.BannedException
hivemind.averaging.partition.TensorPartContainer hivemind.averaging.partition.TensorPartReducer
hivemind.averaging.key_manager.GroupKeyManager hivemind.averaging.key_manager.GroupKeyManager.current_key
hivemind.averaging.key_manager.GroupKeyManager.declare_averager
hivemind.averaging.key_manager.GroupKeyManager.get_averagers
hivemind.averaging.key_manager.GroupKeyManager.update_key_on_group_assembled
hivemind.averaging.key_manager.GROUP_PATTERN hivemind.averaging.key_manager.is_valid_group
hivemind.averaging.matchmaking.Matchmaking hivemind.averaging.matchmaking.MatchmakingException
hivemind.averaging.matchmaking.PotentialLeaders hivemind.averaging.load_balancing.optimize_parts_lp
hivemind.averaging.load_balancing.hagenbach_bishoff hivemind.averaging.control.AveragingStage
hivemind.averaging.allreduce.AveragingMode hivemind.GradScaler.step
hivemind.optim.progress_tracker.LocalTrainingProgress hivemind.optim.progress_tracker.TrainingProgressSchema
hivemind.optim.grad_averager.GradientAveragerFactory hivemind.TrainingAverager.load_state_from_peers
hivemind.compression.BlockwiseQuantization hivemind.compression.TensorRole
hivemind.proto.runtime_pb2.CompressionType hivemind.utils.DHTExpiration hivemind.utils.SerializerBase
hivemind.utils.logging.HandlerMode hivemind.utils.multiaddr.Multiaddr hivemind.utils.multiaddr.Multiaddr.to_bytes
hivemind.utils.multiaddr.Multiaddr.protocols hivemind.utils.multiaddr.Multiaddr.encapsulate
hivemind.utils.multiaddr.Multiaddr.decapsulate hivemind.utils.multiaddr.Multiaddr.value_for_protocol
hivemind.utils.crypto.RSAPublicKey hivemind.utils.crypto.RSAPrivateKey.to_bytes
hivemind.utils.crypto.RSAPrivateKey.from_bytes hivemind.utils.crypto.RSAPrivateKey.get_public_key
hivemind.utils.crypto.RSAPublicKey.to_bytes hivemind.utils.crypto.RSAPublicKey.from_bytes
hivemind.utils.auth.AuthorizerBase hivemind.utils.auth.TokenAuthorizerBase hivemind.utils.auth.AuthRole
hivemind.utils.auth.AuthRPCWrapper hivemind.utils.MPFuture.__await__
"""

VALUES = {
    "hivemind.dht.DHTID.HASH_NBYTES": 20,
    "hivemind.dht.DHTID.MIN": 0,
    "hivemind.dht.DHTID.MAX": 2**160,
    "hivemind.utils.MAX_DHT_TIME_DISCREPANCY_SECONDS": 3,
    "hivemind.dht.protocol.DHTProtocol.IS_REGULAR_VALUE": b"\xc0",
    "hivemind.dht.protocol.DHTProtocol.IS_DICTIONARY": b"",
    "hivemind.p2p.P2P.HEADER_LEN": 8,
    "hivemind.p2p.P2P.BYTEORDER": "big",
    "hivemind.p2p.P2P.MESSAGE_MARKER": b"\x00",
    "hivemind.p2p.P2P.ERROR_MARKER": b"\x01",
    "hivemind.p2p.p2p_daemon_bindings.control.DEFAULT_MAX_MSG_SIZE": 4 * 1024**2,
    "hivemind.p2p.p2p_daemon_bindings.control.MAX_UNARY_PAYLOAD_SIZE": 2 * 1024**2,
    "hivemind.moe.expert_uid.UID_DELIMITER": ".",
    "hivemind.moe.expert_uid.FLAT_EXPERT": -1,
    "hivemind.averaging.partition.DEFAULT_PART_SIZE_BYTES": 2**19,
    "hivemind.utils.tensor_descr.DUMMY_BATCH_SIZE": 3,
    "hivemind.utils.streaming.STREAMING_CHUNK_SIZE_BYTES": 65536,
}

SAME = {  # name -> the object it re-exports
    "hivemind.DHT": "hivemind.dht.dht.DHT",
    "hivemind.DecentralizedAverager": "hivemind.averaging.averager.DecentralizedAverager",
    "hivemind.Optimizer": "hivemind.optim.optimizer.Optimizer",
    "hivemind.GradScaler": "hivemind.optim.grad_scaler.GradScaler",
    "hivemind.TrainingAverager": "hivemind.optim.training_averager.TrainingAverager",
    "hivemind.RemoteExpert": "hivemind.moe.client.expert.RemoteExpert",
    "hivemind.RemoteMixtureOfExperts": "hivemind.moe.client.moe.RemoteMixtureOfExperts",
    "hivemind.RemoteSwitchMixtureOfExperts": "hivemind.moe.client.switch_moe.RemoteSwitchMixtureOfExperts",
    "hivemind.Server": "hivemind.moe.server.server.Server",
    "hivemind.ModuleBackend": "hivemind.moe.server.module_backend.ModuleBackend",
    "hivemind.register_expert_class": "hivemind.moe.server.layers.custom_experts.register_expert_class",
    "hivemind.dht.DHTNode": "hivemind.dht.node.DHTNode",
    "hivemind.dht.DHTID": "hivemind.dht.routing.DHTID",
    "hivemind.utils.ValueWithExpiration": "hivemind.utils.timed_storage.ValueWithExpiration",
    "hivemind.dht.schema.RSASignatureValidator": "hivemind.dht.crypto.RSASignatureValidator",
    "hivemind.averaging.averager.AveragingMode": "hivemind.averaging.allreduce.AveragingMode",
    "hivemind.moe.declare_experts": "hivemind.moe.server.dht_handler.declare_experts",
    "hivemind.moe.get_experts": "hivemind.moe.server.dht_handler.get_experts",
    "hivemind.moe.background_server": "hivemind.moe.server.background_server",
    "hivemind.moe.register_expert_class": "hivemind.moe.server.layers.custom_experts.register_expert_class",
    "hivemind.optim.Optimizer": "hivemind.optim.optimizer.Optimizer",
    "hivemind.optim.GradScaler": "hivemind.optim.grad_scaler.GradScaler",
    "hivemind.optim.TrainingAverager": "hivemind.optim.training_averager.TrainingAverager",
}

# exports each package lists (``from package import *`` and the reference's "Exports" lines)
EXPORTS = {
    "hivemind.dht": "DHT DHTNode DHTID DHTValue",
    "hivemind.p2p": "P2P P2PContext P2PDaemonError P2PHandlerError PeerID PeerInfo ServicerBase StubBase",
    "hivemind.moe": "RemoteExpert RemoteMixtureOfExperts RemoteSwitchMixtureOfExperts Server ModuleBackend "
    "background_server declare_experts get_experts register_expert_class",
    "hivemind.averaging": "DecentralizedAverager",
    "hivemind.optim": "Optimizer GradScaler TrainingAverager",
    "hivemind.compression": "CompressionBase CompressionInfo TensorRole NoCompression Float16Compression "
    "ScaledFloat16Compression Uniform8BitQuantization Quantile8BitQuantization BlockwiseQuantization "
    "SizeAdaptiveCompression RoleAdaptiveCompression PerTensorCompression serialize_torch_tensor "
    "deserialize_torch_tensor deserialize_tensor_stream",
    "hivemind.utils": "get_dht_time DHTExpiration ValueWithExpiration TimedStorage MAX_DHT_TIME_DISCREPANCY_SECONDS "
    "MPFuture get_logger MSGPackSerializer SerializerBase TensorDescriptor nested_flatten nested_pack nested_map "
    "PerformanceEMA as_aiter amap_in_executor switch_to_uvloop enter_asynchronously",
}

# differences that are deliberate and described in docs/compatibility.md ("Known differences")
ALLOWED = {
    "hivemind.moe.Server: 'num_connection_handlers' defaults to None, documented as 1": (
        "Connection handlers: without num_connection_handlers the server serves from one handler thread"
    ),
}
